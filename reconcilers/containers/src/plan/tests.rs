//! Planning of the container settings (user, capabilities, tmpfs, logging, …): each is
//! part of the replacement hash and of the diff, and unset ones change neither.

use super::*;
use crate::driver::RunState;
use serde_json::json;

const NODE: &str = "n1";
const IMAGE_ID: &str = "sha256:0123";

/// Each setting with a value, and a second value for it.
fn settings() -> Vec<(&'static str, serde_json::Value, serde_json::Value)> {
    vec![
        ("entrypoint", json!(["/bin/httpd"]), json!(["/bin/sh"])),
        ("user", json!("1000"), json!("1000:1000")),
        ("workingDir", json!("/srv"), json!("/app")),
        ("hostname", json!("web-1"), json!("web-2")),
        (
            "extraHosts",
            json!({"db": "10.0.0.5"}),
            json!({"db": "10.0.0.6"}),
        ),
        ("capAdd", json!(["NET_ADMIN"]), json!(["NET_RAW"])),
        ("capDrop", json!(["MKNOD"]), json!(["ALL"])),
        ("readOnlyRootfs", json!(true), json!(false)),
        (
            "tmpfs",
            json!([{"target": "/run"}]),
            json!([{"target": "/run", "size": "1Mi"}]),
        ),
        (
            "ulimits",
            json!({"nofile": {"soft": 1024, "hard": 1024}}),
            json!({"nofile": {"soft": 1024, "hard": 2048}}),
        ),
        (
            "sysctls",
            json!({"net.core.somaxconn": "1024"}),
            json!({"net.core.somaxconn": "512"}),
        ),
        ("stopSignal", json!("SIGQUIT"), json!("SIGINT")),
        (
            "logging",
            json!({"driver": "json-file", "options": {"maxSize": "10Mi"}}),
            json!({"driver": "json-file", "options": {"maxSize": "10Mi", "maxFile": 2}}),
        ),
        ("devices", json!(["/dev/fuse"]), json!(["/dev/fuse:r"])),
        (
            "dns",
            json!({"servers": ["10.0.0.1"]}),
            json!({"search": ["internal"]}),
        ),
    ]
}

fn base() -> serde_json::Value {
    json!({"name": "web", "image": "localhost/busybox:test", "args": ["sleep", "1000"]})
}

fn with(field: &str, value: &serde_json::Value) -> Container {
    let mut v = base();
    v[field] = value.clone();
    serde_json::from_value(v).unwrap()
}

fn hash(c: &Container) -> String {
    desired(c, NODE, &BTreeMap::new()).unwrap().1
}

/// A running instance created from `c`, as the runtime would report it.
fn instance(c: &Container) -> RuntimeContainer {
    let (spec, _) = desired(c, NODE, &BTreeMap::new()).unwrap();
    RuntimeContainer {
        id: format!("id-{}", hash(c)),
        name: c.name.clone(),
        labels: spec.labels,
        image: c.image.clone(),
        image_id: IMAGE_ID.into(),
        state: RunState::Running,
        exit_code: None,
        health: None,
        addresses: Vec::new(),
        ports: Vec::new(),
        mounts: Vec::new(),
        memory: None,
        pids_limit: None,
    }
}

fn plan_for(want: &Container, running: &Container) -> Plan<Action> {
    let observed = Observed {
        containers: vec![instance(running)],
        images: BTreeMap::from([(
            want.image.clone(),
            Some(LocalImage {
                id: IMAGE_ID.to_string(),
                digests: Vec::new(),
            }),
        )]),
        ..Default::default()
    };
    let spec = Workload {
        containers: Some(vec![want.clone()]),
        networks: None,
        registries: Vec::new(),
        images: None,
    };
    plan(&spec, &observed, NODE, &Facts::default())
}

#[test]
fn unset_settings_leave_the_recorded_entry_and_its_hash_unchanged() {
    // Containers created before these fields existed keep their hash: no replacement
    // of every container on upgrade.
    let c: Container = serde_json::from_value(base()).unwrap();
    let v = serde_json::to_value(&c).unwrap();
    for (field, _, _) in settings() {
        assert!(v.get(field).is_none(), "{field} serialized while unset");
    }
    assert_eq!(
        desired(&c, NODE, &BTreeMap::new()).unwrap().0.settings,
        Default::default()
    );
}

#[test]
fn every_setting_is_part_of_the_replacement_hash() {
    let plain: Container = serde_json::from_value(base()).unwrap();
    for (field, a, b) in settings() {
        let (ca, cb) = (with(field, &a), with(field, &b));
        assert_ne!(hash(&ca), hash(&plain), "{field} set");
        assert_ne!(hash(&ca), hash(&cb), "{field} changed");
        assert_eq!(hash(&ca), hash(&with(field, &a)), "{field} deterministic");
    }
}

#[test]
fn every_setting_change_replaces_the_container_and_shows_in_the_diff() {
    for (field, a, b) in settings() {
        let (ca, cb) = (with(field, &a), with(field, &b));
        // Converged: nothing to do.
        let p = plan_for(&ca, &ca);
        assert!(p.actions.is_empty(), "{field}: {:?}", p.actions);
        // Changed: a replacement, and the diff names the field with both values.
        let p = plan_for(&cb, &ca);
        let ch = p
            .changes
            .iter()
            .find(|c| c.id == "web")
            .unwrap_or_else(|| panic!("{field}: no change"));
        assert_eq!(ch.op, Op::Update, "{field}");
        let f = ch
            .fields
            .iter()
            .find(|f| f.field == field)
            .unwrap_or_else(|| panic!("{field} missing from {:?}", ch.fields));
        assert_eq!(f.old, Some(a.to_string()), "{field}");
        let new = if b == json!(false) {
            None
        } else {
            Some(b.to_string())
        };
        assert_eq!(f.new, new, "{field}");
        assert!(
            matches!(&p.actions[..], [Action::Container { steps, .. }]
                if matches!(steps[..], [Step::StartFirst { .. }])),
            "{field}: {:?}",
            p.actions
        );
    }
}

#[test]
fn entrypoint_is_command_under_compose_name() {
    let c = with("entrypoint", &json!(["/bin/httpd", "-f"]));
    let (spec, _) = desired(&c, NODE, &BTreeMap::new()).unwrap();
    assert_eq!(spec.command, Some(vec!["/bin/httpd".into(), "-f".into()]));
    assert_eq!(spec.args, Some(vec!["sleep".into(), "1000".into()]));
    let c = with("command", &json!(["/bin/httpd"]));
    let (spec, _) = desired(&c, NODE, &BTreeMap::new()).unwrap();
    assert_eq!(spec.command, Some(vec!["/bin/httpd".into()]));
}

#[test]
fn settings_are_normalized_for_the_runtimes() {
    let mut v = base();
    v["capAdd"] = json!(["net_admin", "CAP_SYS_TIME"]);
    v["capDrop"] = json!(["all"]);
    v["stopSignal"] = json!("quit");
    v["tmpfs"] = json!([{"target": "/run", "size": "1Mi", "mode": "0755"}]);
    v["devices"] = json!(["/dev/fuse"]);
    v["extraHosts"] = json!({"b": "fd00::1", "a": "10.0.0.1"});
    let c: Container = serde_json::from_value(v).unwrap();
    let s = desired(&c, NODE, &BTreeMap::new()).unwrap().0.settings;
    assert_eq!(s.cap_add, ["CAP_NET_ADMIN", "CAP_SYS_TIME"]);
    assert_eq!(s.cap_drop, ["ALL"]);
    assert_eq!(
        s.stop_signal,
        Some(crate::driver::StopSignal {
            name: "SIGQUIT".into(),
            number: 3
        })
    );
    assert_eq!(
        s.tmpfs[0].options(),
        [
            "rw",
            "noexec",
            "nosuid",
            "nodev",
            "size=1048576",
            "mode=755"
        ]
    );
    assert_eq!(s.devices[0].container, "/dev/fuse");
    assert_eq!(s.devices[0].permissions, "rwm");
    assert_eq!(
        s.extra_hosts,
        [
            ("a".to_string(), "10.0.0.1".parse().unwrap()),
            ("b".to_string(), "fd00::1".parse().unwrap())
        ]
    );
}

/// The plan when the document puts `web` on network `app` and the runtime has
/// `running` and the networks `on_host`.
fn plan_on_network(running: Vec<RuntimeContainer>, on_host: Vec<RuntimeNetwork>) -> Plan<Action> {
    let mut v = base();
    v["network"] = json!("app");
    let c: Container = serde_json::from_value(v).unwrap();
    let net: crate::spec::Network =
        serde_json::from_value(json!({"name": "app", "subnets": [{"subnet": "10.89.0.0/24"}]}))
            .unwrap();
    let observed = Observed {
        containers: running,
        networks: on_host,
        images: BTreeMap::from([(
            c.image.clone(),
            Some(LocalImage {
                id: IMAGE_ID.to_string(),
                digests: Vec::new(),
            }),
        )]),
        ..Default::default()
    };
    let spec = Workload {
        containers: Some(vec![c]),
        networks: Some(vec![net]),
        registries: Vec::new(),
        images: None,
    };
    plan(&spec, &observed, NODE, &Facts::default())
}

#[test]
fn containers_left_on_a_vanished_network_are_recreated_on_the_new_one() {
    // `podman network rm -f` removes the network under converge's running instance
    // (its bridge may go after converge restarted it): the instance would run
    // detached, although the runtime reports it on the network at its address.
    let mut v = base();
    v["network"] = json!("app");
    let c: Container = serde_json::from_value(v).unwrap();
    let stranded = instance(&c);
    let p = plan_on_network(vec![stranded.clone()], Vec::new());
    let Action::Network { name, steps } = &p.actions[0] else {
        panic!("network action first: {:?}", p.actions);
    };
    assert_eq!(name, "app");
    assert!(
        matches!(&steps[..], [NetStep::RemoveContainer { id, .. }, NetStep::Create(_)] if *id == stranded.id),
        "{steps:?}"
    );
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::Container { name, steps }
            if name == "web" && matches!(steps[..], [Step::Create { start: true, .. }]))),
        "recreated: {:?}",
        p.actions
    );
    assert!(p
        .changes
        .iter()
        .any(|ch| ch.fields.iter().any(|f| f.field == "network"
            && f.new.as_deref() == Some("recreated on the replaced network app"))));

    // A network made for the first time removes nothing.
    let p = plan_on_network(Vec::new(), Vec::new());
    let Action::Network { steps, .. } = &p.actions[0] else {
        panic!("network action first: {:?}", p.actions);
    };
    assert!(matches!(&steps[..], [NetStep::Create(_)]), "{steps:?}");
}
