//! Unit tests of plan/apply against the in-memory runtime.

use super::*;
use crate::driver::fake::FakeRuntime;
use crate::plan::NEXT_SUFFIX;
use converge_core::Op;
use proptest::prelude::*;

const NODE: &str = "node-1";

fn rt() -> Containers<FakeRuntime> {
    let fake = FakeRuntime::default();
    fake.with(|s| {
        for img in ["localhost/busybox:test", "localhost/other:1"] {
            s.images.insert(img.into(), format!("sha256:{img}"));
        }
        s.registry
            .insert("localhost/pulled:1".into(), "sha256:pulled".into());
    });
    let secrets = std::env::temp_dir().join(format!("cvg-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("db-password"), "s3cret-value\n").unwrap();
    Containers::new(fake, Config::new(NODE, secrets))
}

fn spec(v: serde_json::Value) -> Workload {
    Workload {
        containers: Some(serde_json::from_value(v).unwrap()),
        networks: None,
        registries: Vec::new(),
        images: None,
    }
}

/// A spec with both sections.
fn with_networks(containers: serde_json::Value, networks: serde_json::Value) -> Workload {
    Workload {
        containers: Some(serde_json::from_value(containers).unwrap()),
        networks: Some(serde_json::from_value(networks).unwrap()),
        registries: Vec::new(),
        images: None,
    }
}

fn web(env: &str) -> serde_json::Value {
    serde_json::json!({"name": "web", "image": "localhost/busybox:test", "env": {"MODE": env}, "command": ["httpd", "-f"]})
}

async fn pass(
    c: &Containers<FakeRuntime>,
    s: &Workload,
) -> (Vec<converge_core::Change>, Vec<ObjectOutcome>) {
    let obs = c.observe(s).await.unwrap();
    let p = c.plan(s, &obs, &Facts::default());
    let changes = p.changes.clone();
    (changes, c.apply(p).await)
}

async fn pending(c: &Containers<FakeRuntime>, s: &Workload) -> Plan<Action> {
    let obs = c.observe(s).await.unwrap();
    c.plan(s, &obs, &Facts::default())
}

fn log(c: &Containers<FakeRuntime>) -> Vec<String> {
    c.runtime().with(|s| std::mem::take(&mut s.log))
}

fn ok(out: &[ObjectOutcome]) {
    assert!(out.iter().all(|o| o.error.is_none()), "{out:?}");
}

#[tokio::test(start_paused = true)]
async fn creates_then_is_converged_and_publishes_addresses() {
    let c = rt();
    let s = spec(
        serde_json::json!([web("a"), {"name": "db", "image": "localhost/other:1", "ports": [{"containerPort": 5432, "hostPort": 5432}]}]),
    );
    let (changes, out) = pass(&c, &s).await;
    ok(&out);
    assert_eq!(changes.iter().filter(|c| c.op == Op::Create).count(), 2);
    assert!(pending(&c, &s).await.is_empty());
    let obs = c.observe(&s).await.unwrap();
    let Some(FactsUpdate::Containers(f)) = c.publish(&obs) else {
        panic!("no facts")
    };
    assert!(f["web"].running && !f["web"].addresses.is_empty());
}

#[tokio::test(start_paused = true)]
async fn spec_change_without_host_ports_replaces_start_first() {
    let c = rt();
    let mut s = spec(serde_json::json!([web("a")]));
    ok(&pass(&c, &s).await.1);
    log(&c);
    s = spec(serde_json::json!([web("b")]));
    let (changes, out) = pass(&c, &s).await;
    ok(&out);
    let fields: Vec<String> = changes[0]
        .fields
        .iter()
        .map(|f| format!("{}: {:?} -> {:?}", f.field, f.old, f.new))
        .collect();
    assert!(
        fields
            .iter()
            .any(|f| f.starts_with("env:") && f.contains("\\\"b\\\"")),
        "{fields:?}"
    );
    let next = format!("web{NEXT_SUFFIX}");
    assert_eq!(
        log(&c),
        vec![
            format!("create {next}"),
            format!("start {next}"),
            "stop web".into(),
            "remove web".into(),
            format!("rename {next} web")
        ]
    );
    assert!(pending(&c, &s).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn spec_change_with_host_ports_stops_first() {
    let c = rt();
    let mut v = web("a");
    v["ports"] = serde_json::json!([{"containerPort": 80, "hostPort": 8080}]);
    ok(&pass(&c, &spec(serde_json::json!([v.clone()]))).await.1);
    log(&c);
    v["env"]["MODE"] = "b".into();
    ok(&pass(&c, &spec(serde_json::json!([v]))).await.1);
    assert_eq!(
        log(&c),
        vec!["stop web", "remove web", "create web", "start web"]
    );
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_replace_is_finished_without_orphans() {
    let c = rt();
    ok(&pass(&c, &spec(serde_json::json!([web("a")]))).await.1);
    // Simulate kill -9 after the new instance started but before the old was removed.
    let s2 = spec(serde_json::json!([web("b")]));
    let obs = c.observe(&s2).await.unwrap();
    let (mut temp, _) = plan::desired(
        &s2.containers.as_deref().unwrap_or_default()[0],
        NODE,
        &obs.secrets,
    )
    .unwrap();
    temp.name = format!("web{NEXT_SUFFIX}");
    let id = c.runtime().create(&temp).await.unwrap();
    c.runtime().start(&id).await.unwrap();
    log(&c);
    ok(&pass(&c, &s2).await.1);
    assert_eq!(
        log(&c),
        vec![
            "stop web".to_string(),
            "remove web".into(),
            format!("rename web{NEXT_SUFFIX} web")
        ]
    );
    assert_eq!(c.runtime().with(|s| s.containers.len()), 1);
    assert!(pending(&c, &s2).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stale_temporary_instance_does_not_block_the_next_replace() {
    let c = rt();
    ok(&pass(&c, &spec(serde_json::json!([web("a")]))).await.1);
    // An interrupted replace towards spec "b" left `web--next`; the document moved on to "c".
    let s_b = spec(serde_json::json!([web("b")]));
    let obs = c.observe(&s_b).await.unwrap();
    let (mut temp, _) = plan::desired(
        &s_b.containers.as_deref().unwrap_or_default()[0],
        NODE,
        &obs.secrets,
    )
    .unwrap();
    temp.name = format!("web{NEXT_SUFFIX}");
    let id = c.runtime().create(&temp).await.unwrap();
    c.runtime().start(&id).await.unwrap();
    let s_c = spec(serde_json::json!([web("c")]));
    ok(&pass(&c, &s_c).await.1);
    assert!(pending(&c, &s_c).await.is_empty());
    assert_eq!(c.runtime().with(|s| s.containers.len()), 1);
}

#[tokio::test(start_paused = true)]
async fn dead_container_is_restarted_with_crash_loop_back_off() {
    let c = rt();
    let s = spec(serde_json::json!([web("a")]));
    ok(&pass(&c, &s).await.1);
    c.runtime()
        .with(|st| st.crash_on_start.insert("web".into()));
    let kill = || {
        c.runtime().with(|st| {
            st.containers.values_mut().for_each(|x| {
                x.state = RunState::Exited;
                x.exit_code = Some(137);
            })
        })
    };
    kill();
    let (changes, out) = pass(&c, &s).await;
    ok(&out);
    assert_eq!(changes[0].fields[0].old.as_deref(), Some("exited (137)"));
    // Second restart is immediate too; the third waits (back-off): the plan says so and
    // asks to run again when the delay is over, instead of failing the container.
    ok(&pass(&c, &s).await.1);
    let p = pending(&c, &s).await;
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(p.waiting.len(), 1, "{p:?}");
    let w = &p.waiting[0];
    assert!(
        w.id == "web"
            && w.reason.contains("crash loop back-off")
            && w.reason.contains("2 restarts"),
        "{w:?}"
    );
    let after = w.retry_after.expect("a wake-up");
    assert!(
        after > Duration::ZERO && after <= Duration::from_secs(1),
        "{after:?}"
    );
    // Status shows the exit code and the restart count.
    let notes = c.notes(&c.observe(&s).await.unwrap());
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0].note.contains("exit code 1") && notes[0].note.contains("restarted 2 times"),
        "{notes:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn restart_policy_decides_whether_an_exited_container_is_started() {
    let c = rt();
    let s = spec(serde_json::json!([
        {"name": "always", "image": "localhost/busybox:test"},
        {"name": "never", "image": "localhost/busybox:test", "restart": "no"},
        {"name": "failed", "image": "localhost/busybox:test", "restart": "on-failure"},
        {"name": "done", "image": "localhost/busybox:test", "restart": "on-failure"}
    ]));
    ok(&pass(&c, &s).await.1);
    c.runtime().with(|st| {
        for x in st.containers.values_mut() {
            x.state = RunState::Exited;
            x.exit_code = Some(if x.name == "done" { 0 } else { 3 });
        }
    });
    log(&c);
    ok(&pass(&c, &s).await.1);
    let mut started = log(&c);
    started.sort();
    assert_eq!(started, vec!["start always", "start failed"]);
    assert!(
        pending(&c, &s).await.is_empty(),
        "exited per policy is converged"
    );
}

#[tokio::test(start_paused = true)]
async fn removal_keeps_volumes_unless_asked_and_never_touches_foreign_containers() {
    let c = rt();
    let s = spec(serde_json::json!([
        {"name": "keep", "image": "localhost/busybox:test", "volumes": [{"source": "keepdata", "target": "/data"}]},
        {"name": "drop", "image": "localhost/busybox:test", "removeVolumesOnDelete": true, "volumes": [{"source": "dropdata", "target": "/data"}]}
    ]));
    ok(&pass(&c, &s).await.1);
    // A container converge did not create (no labels).
    c.runtime().with(|st| {
        let mut foreign = st.containers.values().next().unwrap().clone();
        foreign.id = "foreign".into();
        foreign.name = "admin-thing".into();
        foreign.labels.clear();
        st.containers.insert("foreign".into(), foreign);
    });
    let (changes, out) = pass(&c, &spec(serde_json::json!([]))).await;
    ok(&out);
    assert_eq!(changes.iter().filter(|c| c.op == Op::Delete).count(), 2);
    c.runtime().with(|st| {
        assert_eq!(st.containers.keys().collect::<Vec<_>>(), vec!["foreign"]);
        assert!(st.volumes.contains("keepdata"));
        assert!(!st.volumes.contains("dropdata"));
    });
}

#[tokio::test(start_paused = true)]
async fn missing_image_is_pulled_and_a_failed_pull_blocks_only_its_container() {
    let c = rt();
    let s = spec(serde_json::json!([
        {"name": "a", "image": "localhost/pulled:1"},
        {"name": "b", "image": "localhost/nowhere:1"},
        {"name": "c", "image": "localhost/busybox:test"}
    ]));
    let (_, out) = pass(&c, &s).await;
    let failed: Vec<&str> = out
        .iter()
        .filter(|o| o.error.is_some())
        .map(|o| o.object.as_str())
        .collect();
    assert_eq!(failed, vec!["container b", "image localhost/nowhere:1"]);
    assert_eq!(c.runtime().with(|st| st.containers.len()), 2);
}

#[tokio::test(start_paused = true)]
async fn secrets_are_injected_but_never_shown_and_a_missing_one_fails_its_container() {
    let c = rt();
    let s = spec(serde_json::json!([
        {"name": "db", "image": "localhost/busybox:test", "secretEnv": {"PASSWORD": "db-password"}},
        {"name": "x", "image": "localhost/busybox:test", "secretEnv": {"TOKEN": "no-such-secret"}}
    ]));
    let obs = c.observe(&s).await.unwrap();
    let p = c.plan(&s, &obs, &Facts::default());
    let shown = format!("{:?} {:?} {:?}", p.changes, p.actions, obs);
    assert!(!shown.contains("s3cret-value"), "secret leaked: {shown}");
    let out = c.apply(p).await;
    assert!(out.iter().any(|o| o.object == "container x"
        && o.error
            .as_deref()
            .unwrap_or_default()
            .contains("no-such-secret")));
    let env = c.runtime().with(|st| {
        st.containers
            .values()
            .find(|x| x.name == "db")
            .map(|x| x.labels.clone())
    });
    assert!(env.is_some());
}

fn arb_spec() -> impl Strategy<Value = Workload> {
    // Networks n0 and n1, each absent or on one of two subnets; containers on n0, n1 or
    // the default network (a container on an absent network is moved to the default).
    let nets = proptest::collection::vec(proptest::option::of(0u8..2), 2..=2);
    let one = (0u8..4, 0u8..3, any::<bool>(), proptest::option::of(8000u16..8003), any::<bool>(), 0u8..3).prop_map(|(n, env, img, port, stopped, net)| {
        let mut v = serde_json::json!({"name": format!("c{n}"), "image": if img { "localhost/busybox:test" } else { "localhost/other:1" }, "env": {"E": env.to_string()}});
        if net < 2 {
            v["network"] = format!("n{net}").into();
        }
        if let Some(p) = port {
            v["ports"] = serde_json::json!([{"containerPort": 80, "hostPort": p + u16::from(n) * 10}]);
        }
        if stopped {
            v["desiredState"] = "stopped".into();
        }
        v
    });
    (nets, proptest::collection::vec(one, 0..5)).prop_map(|(nets, mut v)| {
        v.sort_by_key(|c| c["name"].as_str().unwrap_or_default().to_string());
        v.dedup_by_key(|c| c["name"].clone());
        let networks: Vec<serde_json::Value> = nets
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = (*s)?;
                Some(serde_json::json!({"name": format!("n{i}"), "subnets": [{"subnet": format!("10.{}.{s}.0/24", 200 + i)}]}))
            })
            .collect();
        for c in &mut v {
            let declared = c["network"].as_str().is_some_and(|n| {
                networks.iter().any(|x| x["name"].as_str() == Some(n))
            });
            if !declared {
                if let Some(o) = c.as_object_mut() {
                    o.remove("network");
                }
            }
        }
        with_networks(serde_json::Value::Array(v), serde_json::Value::Array(networks))
    })
}

proptest! {
    /// From any earlier state, one pass converges: the next plan is empty.
    #[test]
    fn one_pass_converges_from_any_previous_spec(before in arb_spec(), after in arb_spec()) {
        let rt_ = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt_.block_on(async {
            let c = rt();
            ok(&pass(&c, &before).await.1);
            ok(&pass(&c, &after).await.1);
            let p = pending(&c, &after).await;
            prop_assert!(p.is_empty(), "not converged: {:?}", p.changes);
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn an_unreachable_runtime_is_named_with_the_flags_that_change_it() {
    let c = Containers::new(
        crate::driver::NoRuntime(
            "neither /run/podman/podman.sock nor /run/docker.sock exists".into(),
        ),
        Config::new("n1", "/nonexistent"),
    );
    let e = c
        .observe(&spec(serde_json::json!([])))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no container runtime")
            && e.contains("/run/podman/podman.sock")
            && e.contains("--podman-socket")
            && e.contains("--runtime"),
        "{e}"
    );
}

fn net(name: &str, subnet: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "subnets": [{"subnet": subnet}]})
}

fn on(name: &str, network: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "image": "localhost/busybox:test", "network": network})
}

/// A container converge does not manage, attached to `network`.
fn foreign_on(c: &Containers<FakeRuntime>, name: &str, network: &str) {
    c.runtime().with(|s| {
        let id = format!("foreign-{name}");
        s.containers.insert(
            id.clone(),
            crate::driver::RuntimeContainer {
                id: id.clone(),
                name: name.into(),
                labels: Default::default(),
                image: "localhost/busybox:test".into(),
                image_id: "sha256:x".into(),
                state: crate::driver::RunState::Running,
                exit_code: None,
                health: None,
                addresses: Vec::new(),
                ports: Vec::new(),
                mounts: Vec::new(),
                memory: None,
                pids_limit: None,
            },
        );
        s.attached.insert(id, network.into());
    });
}

#[tokio::test(start_paused = true)]
async fn a_network_is_created_before_its_containers_and_then_converged() {
    let c = rt();
    let s = with_networks(
        serde_json::json!([on("web", "mesh")]),
        serde_json::json!([net("mesh", "10.210.1.0/24")]),
    );
    let (changes, out) = pass(&c, &s).await;
    ok(&out);
    let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["+ network mesh", "+ container web"]);
    assert_eq!(
        log(&c)[..2],
        ["create network mesh".to_string(), "create web".to_string()]
    );
    let n = c.runtime().with(|s| s.networks["mesh"].clone());
    assert_eq!(
        n.subnets,
        [("10.210.1.0/24".to_string(), Some("10.210.1.1".to_string()))]
    );
    assert!(pending(&c, &s).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_changed_subnet_replaces_the_network_and_recreates_its_containers() {
    let c = rt();
    let nets = |subnet| serde_json::json!([net("mesh", subnet), net("other", "10.220.0.0/24")]);
    let containers = serde_json::json!([on("web", "mesh"), on("db", "other")]);
    ok(&pass(
        &c,
        &with_networks(containers.clone(), nets("10.210.1.0/24")),
    )
    .await
    .1);
    log(&c);
    let s = with_networks(containers, nets("10.210.2.0/24"));
    let (changes, out) = pass(&c, &s).await;
    ok(&out);
    let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["~ network mesh", "~ container web"], "db untouched");
    assert_eq!(
        log(&c),
        [
            "stop web",
            "remove web",
            "remove network mesh",
            "create network mesh",
            "create web",
            "start web"
        ]
    );
    assert!(pending(&c, &s).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_network_a_foreign_container_uses_is_neither_replaced_nor_removed() {
    let c = rt();
    let s = with_networks(
        serde_json::json!([on("web", "mesh")]),
        serde_json::json!([net("mesh", "10.210.1.0/24")]),
    );
    ok(&pass(&c, &s).await.1);
    foreign_on(&c, "theirs", "mesh");
    log(&c);
    // Subnet change: reported on the network, nothing removed.
    let s2 = with_networks(
        serde_json::json!([on("web", "mesh")]),
        serde_json::json!([net("mesh", "10.210.9.0/24")]),
    );
    let (_, out) = pass(&c, &s2).await;
    let failed: Vec<&ObjectOutcome> = out.iter().filter(|o| o.error.is_some()).collect();
    assert_eq!(failed.len(), 1, "{out:?}");
    assert_eq!(failed[0].object, "network mesh");
    assert!(failed[0]
        .error
        .as_deref()
        .is_some_and(|e| e.contains("theirs")));
    assert!(log(&c).is_empty(), "nothing touched");
    // Dropped from the document: converge's container goes, the network waits.
    let s3 = with_networks(serde_json::json!([]), serde_json::json!([]));
    let p = pending(&c, &s3).await;
    assert_eq!(p.waiting.len(), 1, "{:?}", p.waiting);
    assert!(p.waiting[0].to_string().contains("theirs"));
    ok(&c.apply(p).await);
    assert_eq!(log(&c), ["stop web", "remove web"]);
    assert!(c.runtime().with(|s| s.networks.contains_key("mesh")));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_network_goes_after_its_containers_unless_one_stays() {
    let c = rt();
    let s = with_networks(
        serde_json::json!([on("web", "mesh"), on("db", "mesh")]),
        serde_json::json!([net("mesh", "10.210.1.0/24")]),
    );
    ok(&pass(&c, &s).await.1);
    // db still names the network the document no longer declares: the removal waits.
    let keep_db = with_networks(serde_json::json!([on("db", "mesh")]), serde_json::json!([]));
    let p = pending(&c, &keep_db).await;
    assert!(p.waiting.iter().any(|w| w.id == "mesh"), "{:?}", p.waiting);
    log(&c);
    let s = with_networks(serde_json::json!([]), serde_json::json!([]));
    let (changes, out) = pass(&c, &s).await;
    ok(&out);
    assert!(changes.iter().any(|c| c.to_string() == "- network mesh"));
    let l = log(&c);
    assert_eq!(
        l.last().map(String::as_str),
        Some("remove network mesh"),
        "{l:?}"
    );
    assert!(pending(&c, &s).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_foreign_network_with_the_name_is_reported_and_left_alone() {
    let c = rt();
    c.runtime().with(|s| {
        s.networks.insert(
            "mesh".into(),
            crate::driver::RuntimeNetwork {
                name: "mesh".into(),
                labels: Default::default(),
                subnets: vec![("10.1.0.0/24".into(), None)],
            },
        );
    });
    let s = with_networks(
        serde_json::json!([]),
        serde_json::json!([net("mesh", "10.210.1.0/24")]),
    );
    let (_, out) = pass(&c, &s).await;
    assert!(out.iter().any(|o| o.object == "network mesh"
        && o.error
            .as_deref()
            .is_some_and(|e| e.contains("did not create"))));
    let n = c.runtime().with(|s| s.networks["mesh"].clone());
    assert_eq!(n.subnets, [("10.1.0.0/24".to_string(), None)]);
}

/// Facts where the firewall sends traffic to `addresses`.
fn firewall_uses(addresses: &[std::net::IpAddr]) -> Facts {
    let mut f = Facts::default();
    f.in_use
        .insert("firewall".into(), addresses.iter().copied().collect());
    f
}

fn published(c: &Containers<FakeRuntime>, obs: &Observed, name: &str) -> Vec<std::net::IpAddr> {
    match c.publish(obs) {
        Some(FactsUpdate::Containers(f)) => f[name].addresses.clone(),
        _ => Vec::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_replacement_switches_consumers_before_the_old_instance_stops() {
    let c = rt();
    let s = spec(serde_json::json!([web("a")]));
    ok(&pass(&c, &s).await.1);
    let obs = c.observe(&s).await.unwrap();
    let old = published(&c, &obs, "web");
    assert_eq!(old.len(), 1);
    log(&c);

    // The firewall forwards to the old instance: the new one starts, the old keeps serving.
    let s2 = spec(serde_json::json!([web("b")]));
    let facts = firewall_uses(&old);
    let obs = c.observe(&s2).await.unwrap();
    let p = c.plan(&s2, &obs, &facts);
    assert!(
        p.changes[0]
            .fields
            .iter()
            .any(|f| f.new.as_deref() == Some("start new, wait healthy, switch firewall, stop old")),
        "{:?}",
        p.changes
    );
    ok(&c.apply(p).await);
    assert_eq!(
        log(&c),
        [
            format!("create web{NEXT_SUFFIX}"),
            format!("start web{NEXT_SUFFIX}")
        ]
    );

    // Facts now point at the new instance; the old waits while the firewall still uses it.
    let obs = c.observe(&s2).await.unwrap();
    let new = published(&c, &obs, "web");
    assert_ne!(new, old, "the ready replacement is published");
    let p = c.plan(&s2, &obs, &facts);
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.waiting.len(), 1);
    assert!(p.waiting[0].reason.contains("firewall"), "{}", p.waiting[0]);
    assert_eq!(p.waiting[0].retry_after, Some(crate::plan::SWITCH_POLL));

    // Once the firewall has switched, the old one is retired and the new one renamed.
    let facts = firewall_uses(&new);
    let p = c.plan(&s2, &obs, &facts);
    assert!(p.waiting.is_empty());
    ok(&c.apply(p).await);
    assert_eq!(
        log(&c),
        [
            "stop web",
            "remove web",
            format!("rename web{NEXT_SUFFIX} web").as_str()
        ]
    );
    let obs = c.observe(&s2).await.unwrap();
    assert_eq!(
        published(&c, &obs, "web"),
        new,
        "renaming keeps the address"
    );
    assert!(c.plan(&s2, &obs, &facts).is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_old_instance_still_in_use_after_the_timeout_is_stopped_anyway() {
    let c = rt();
    ok(&pass(&c, &spec(serde_json::json!([web("a")]))).await.1);
    let s2 = spec(serde_json::json!([web("b")]));
    let mut obs = c.observe(&s2).await.unwrap();
    let old = published(&c, &obs, "web");
    let facts = firewall_uses(&old);
    ok(&c.apply(c.plan(&s2, &obs, &facts)).await);
    obs = c.observe(&s2).await.unwrap();
    assert!(!c.plan(&s2, &obs, &facts).waiting.is_empty());
    obs.switching
        .insert("web".into(), crate::plan::SWITCH_TIMEOUT);
    let p = c.plan(&s2, &obs, &facts);
    assert!(p.waiting.is_empty());
    assert!(
        matches!(&p.actions[..], [Action::Container { steps, .. }] if matches!(steps[0], Step::Retire { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn a_static_ip_replaces_stop_first() {
    let c = rt();
    let w = |env: &str| serde_json::json!([{"name": "web", "image": "localhost/busybox:test", "env": {"MODE": env}, "network": "podman", "ip": "10.88.0.50"}]);
    ok(&pass(&c, &spec(w("a"))).await.1);
    let (changes, out) = pass(&c, &spec(w("b"))).await;
    ok(&out);
    assert!(changes[0]
        .fields
        .iter()
        .any(|f| f.new.as_deref() == Some("stop old, start new (static ip)")));
}

#[tokio::test(start_paused = true)]
async fn pull_policies_and_registry_credentials() {
    let c = rt();
    c.runtime().with(|s| {
        s.registry
            .insert("reg.example:5000/app:1".into(), "sha256:app1".into());
    });
    let mut s = spec(serde_json::json!([
        {"name": "app", "image": "reg.example:5000/app:1", "pullPolicy": "always"},
        {"name": "offline", "image": "localhost/absent:1", "pullPolicy": "never"}
    ]));
    s.registries = serde_json::from_value(serde_json::json!([
        {"server": "reg.example:5000", "username": "ci", "passwordSecret": "db-password"}
    ]))
    .unwrap();
    let p = pending(&c, &s).await;
    // `never`: no pull, a failed object that says why.
    let never = p.waiting.iter().find(|w| w.id == "offline").unwrap();
    assert!(
        never.failed && never.reason.contains("pullPolicy is never"),
        "{never:?}"
    );
    assert!(!log(&c).iter().any(|l| l.contains("absent")));
    // The registry's credentials go with the pull (the password read from its secret).
    ok(&pass(&c, &s).await.1);
    let pulls: Vec<String> = log(&c)
        .into_iter()
        .filter(|l| l.starts_with("pull"))
        .collect();
    assert_eq!(pulls, vec!["pull reg.example:5000/app:1 as ci".to_string()]);
    // `always`: not again within ALWAYS_PULL_EVERY (the clock is paused: real time moves
    // only when the test says).
    assert!(!pending(&c, &s)
        .await
        .actions
        .iter()
        .any(|a| matches!(a, Action::Pull { .. })));
    tokio::time::advance(plan::ALWAYS_PULL_EVERY).await;
    let again = pending(&c, &s).await;
    assert!(
        again
            .changes
            .iter()
            .any(|ch| ch.kind == "image" && ch.op == Op::Update),
        "{:?}",
        again.changes
    );
}

/// A workload with an `images` section.
fn with_images(containers: serde_json::Value, images: serde_json::Value) -> Workload {
    Workload {
        containers: Some(serde_json::from_value(containers).unwrap()),
        networks: None,
        registries: Vec::new(),
        images: Some(serde_json::from_value(images).unwrap()),
    }
}

const MB: u64 = 1_000_000;

/// Images of 10 MB on a 100 MB store at 90 %: `used:1` (a converge container's),
/// `foreign:1` (a stopped container converge does not own), `kept:1`, `old:1` and
/// `new:1` (unused; old built first).
fn gc_node() -> Containers<FakeRuntime> {
    let c = rt();
    c.runtime().with(|s| {
        for (i, name) in ["old", "used", "foreign", "kept", "new"].iter().enumerate() {
            let id = format!("sha256:{name}");
            s.images.insert(format!("localhost/{name}:1"), id.clone());
            s.image_meta.insert(id, (10 * MB, 1000 + i as i64));
        }
        s.images.remove("localhost/other:1");
        s.images.remove("localhost/busybox:test");
        s.images
            .insert("localhost/busybox:test".into(), "sha256:used".into());
        s.disk = crate::driver::DiskUsage {
            capacity: 100 * MB,
            used: 90 * MB,
        };
    });
    c
}

fn images_left(c: &Containers<FakeRuntime>) -> Vec<String> {
    c.runtime().with(|s| s.images.keys().cloned().collect())
}

#[tokio::test(start_paused = true)]
async fn gc_frees_down_to_low_without_touching_used_foreign_or_kept_images() {
    let c = gc_node();
    let s = with_images(
        serde_json::json!([{"name": "app", "image": "localhost/used:1"}]),
        serde_json::json!({"gc": {"highPercent": 85, "lowPercent": 80, "keep": ["localhost/kept"], "minAge": "0s"}}),
    );
    // A stopped container converge does not own, made from foreign:1.
    let mut foreign = crate::driver::sample_create_spec();
    foreign.labels.clear();
    foreign.name = "admin-thing".into();
    foreign.image = "localhost/foreign:1".into();
    let id = c.runtime().create(&foreign).await.unwrap();
    c.runtime().stop(&id, Duration::ZERO).await.unwrap();
    log(&c);
    // 90 % ≥ 85 %: 10 MB to free; the oldest unused image is enough.
    let (changes, out) = pass(&c, &s).await;
    ok(&out);
    let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(shown, ["+ container app", "- image localhost/old:1"]);
    assert_eq!(
        log(&c),
        ["create app", "start app", "remove image localhost/old:1"]
    );
    assert!(
        pending(&c, &s).await.is_empty(),
        "80 % is below the high mark"
    );
    let obs = c.observe(&s).await.unwrap();
    let note = c
        .notes(&obs)
        .into_iter()
        .find(|n| n.object == "image store")
        .unwrap();
    assert!(
        note.note
            .starts_with("80.0% of 100.0 MB used (gc from 85% down to 80%)"),
        "{}",
        note.note
    );
    assert!(
        note.note.contains("removed 1 images, freed 10.0 MB"),
        "{}",
        note.note
    );

    // Fuller still: everything nobody needs goes, and the note says it was not enough.
    c.runtime().with(|s| s.disk.used = 99 * MB);
    let (changes, out) = pass(&c, &s).await;
    ok(&out);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(
        images_left(&c),
        [
            "localhost/busybox:test",
            "localhost/foreign:1",
            "localhost/kept:1",
            "localhost/used:1"
        ]
    );
    let obs = c.observe(&s).await.unwrap();
    let note = c
        .notes(&obs)
        .into_iter()
        .find(|n| n.object == "image store")
        .unwrap();
    assert!(note.note.contains("only 0 B of the"), "{}", note.note);
}

#[tokio::test(start_paused = true)]
async fn gc_waits_min_age_and_diff_shows_what_it_would_remove() {
    let c = gc_node();
    let s = with_images(
        serde_json::json!([]),
        serde_json::json!({"gc": {"minAge": "10m"}}),
    );
    assert!(
        pending(&c, &s).await.is_empty(),
        "images first seen now are too young"
    );
    tokio::time::advance(std::time::Duration::from_secs(601)).await;
    let p = pending(&c, &s).await;
    assert_eq!(p.changes.len(), 1);
    let c0 = &p.changes[0];
    assert_eq!(c0.to_string(), "- image localhost/old:1");
    assert_eq!(c0.fields[0].field, "size");
    assert_eq!(c0.fields[0].old.as_deref(), Some("10.0 MB"));
    // A dry run (plan only) removed nothing.
    assert_eq!(images_left(&c).len(), 6);
}

#[tokio::test(start_paused = true)]
async fn an_image_a_container_starts_using_after_observe_is_kept() {
    let c = gc_node();
    let s = with_images(
        serde_json::json!([]),
        serde_json::json!({"gc": {"minAge": "0s"}}),
    );
    let p = pending(&c, &s).await;
    assert_eq!(p.actions.len(), 1);
    // A container made from it between the observation and the removal.
    let fake = c.runtime();
    let mut spec = crate::driver::sample_create_spec();
    spec.labels.clear();
    spec.name = "late".into();
    spec.image = "localhost/old:1".into();
    fake.create(&spec).await.unwrap();
    log(&c);
    ok(&c.apply(p).await);
    assert!(images_left(&c).contains(&"localhost/old:1".to_string()));
    assert!(log(&c).is_empty());
}

#[tokio::test(start_paused = true)]
async fn prefetch_pulls_ahead_reports_done_and_protects_the_image() {
    let c = rt();
    c.runtime().with(|s| {
        s.registry
            .insert("localhost/next:2".into(), "sha256:next".into());
        s.disk = crate::driver::DiskUsage {
            capacity: 100 * MB,
            used: 99 * MB,
        };
    });
    let s = with_images(
        serde_json::json!([]),
        serde_json::json!({"prefetch": ["localhost/next:2", "localhost/nowhere:1"], "gc": {"minAge": "0s"}}),
    );
    let (changes, out) = pass(&c, &s).await;
    let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    // The two unused test images go; the prefetched one is protected once pulled.
    assert!(
        shown.contains(&"+ image localhost/next:2".to_string()),
        "{shown:?}"
    );
    let failed: Vec<&str> = out
        .iter()
        .filter(|o| o.error.is_some())
        .map(|o| o.object.as_str())
        .collect();
    assert_eq!(failed, ["image localhost/nowhere:1"]);
    assert!(images_left(&c).contains(&"localhost/next:2".to_string()));
    let p = pending(&c, &s).await;
    assert!(
        !p.changes.iter().any(|c| c.id == "localhost/next:2"),
        "never collected while listed: {:?}",
        p.changes
    );
    // The failure waits its back-off, as a failed object.
    assert_eq!(p.waiting.len(), 1, "{:?}", p.waiting);
    assert!(p.waiting[0].failed && p.waiting[0].reason.contains("next try in 10s"));
    let obs = c.observe(&s).await.unwrap();
    let notes = c.notes(&obs);
    let done = notes
        .iter()
        .find(|n| n.object == "image localhost/next:2")
        .unwrap();
    assert!(
        done.note.starts_with("prefetched: 2 B, 1 layers in"),
        "{}",
        done.note
    );
}

#[tokio::test(start_paused = true)]
async fn background_prefetch_ends_as_a_host_event() {
    let fake = FakeRuntime::default();
    fake.with(|s| {
        s.registry
            .insert("localhost/next:2".into(), "sha256:next".into());
    });
    let mut config = Config::new(NODE, std::env::temp_dir());
    config.background_prefetch = true;
    let c = Containers::new(fake, config);
    let mut events = c.host_events().unwrap();
    let s = with_images(
        serde_json::json!([]),
        serde_json::json!({"prefetch": ["localhost/next:2"]}),
    );
    ok(&pass(&c, &s).await.1);
    let e = events.next().await.unwrap();
    assert_eq!(e.0, "image localhost/next:2 prefetched");
    assert!(pending(&c, &s).await.is_empty());
}
