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

fn spec(v: serde_json::Value) -> Vec<Container> {
    serde_json::from_value(v).unwrap()
}

fn web(env: &str) -> serde_json::Value {
    serde_json::json!({"name": "web", "image": "localhost/busybox:test", "env": {"MODE": env}, "command": ["httpd", "-f"]})
}

async fn pass(
    c: &Containers<FakeRuntime>,
    s: &Vec<Container>,
) -> (Vec<converge_core::Change>, Vec<ObjectOutcome>) {
    let obs = c.observe(s).await.unwrap();
    let p = c.plan(s, &obs, &Facts::default());
    let changes = p.changes.clone();
    (changes, c.apply(p).await)
}

async fn pending(c: &Containers<FakeRuntime>, s: &Vec<Container>) -> Plan<Action> {
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
    let (mut temp, _) = plan::desired(&s2[0], NODE, &obs.secrets).unwrap();
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
    let (mut temp, _) = plan::desired(&s_b[0], NODE, &obs.secrets).unwrap();
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

fn arb_spec() -> impl Strategy<Value = Vec<Container>> {
    let one = (0u8..4, 0u8..3, any::<bool>(), proptest::option::of(8000u16..8003), any::<bool>()).prop_map(|(n, env, img, port, stopped)| {
        let mut v = serde_json::json!({"name": format!("c{n}"), "image": if img { "localhost/busybox:test" } else { "localhost/other:1" }, "env": {"E": env.to_string()}});
        if let Some(p) = port {
            v["ports"] = serde_json::json!([{"containerPort": 80, "hostPort": p + u16::from(n) * 10}]);
        }
        if stopped {
            v["desiredState"] = "stopped".into();
        }
        v
    });
    proptest::collection::vec(one, 0..5).prop_map(|mut v| {
        v.sort_by_key(|c| c["name"].as_str().unwrap_or_default().to_string());
        v.dedup_by_key(|c| c["name"].clone());
        spec(serde_json::Value::Array(v))
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
