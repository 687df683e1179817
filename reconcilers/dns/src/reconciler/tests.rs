//! Unit tests of the DNS plan/apply logic against the in-memory driver.

use super::*;
use crate::driver::fake::FakeDriver;
use crate::render::Layout;
use crate::spec::{DnsSpec, Record, RecordType};
use converge_core::{Change, Facts};
use proptest::prelude::*;

fn spec(records: serde_json::Value) -> DnsSpec {
    serde_json::from_value(serde_json::json!({
        "zone": "internal", "listen": ["127.0.0.1"], "port": 5353, "records": records
    }))
    .unwrap()
}

fn dns() -> Dns<FakeDriver> {
    Dns::new(FakeDriver::new(Layout::new("/fake/dns")))
}

async fn converge(d: &Dns<FakeDriver>, s: &DnsSpec) -> Vec<Change> {
    let obs = d.observe(s).await.unwrap();
    let p = d.plan(s, &obs, &Facts::default());
    let changes = p.changes.clone();
    let outcomes = d.apply(p).await;
    assert!(outcomes.iter().all(|o| o.error.is_none()), "{outcomes:?}");
    changes
}

async fn pending(d: &Dns<FakeDriver>, s: &DnsSpec) -> Plan<Action> {
    let obs = d.observe(s).await.unwrap();
    d.plan(s, &obs, &Facts::default())
}

#[tokio::test]
async fn first_pass_creates_everything_then_converged() {
    let d = dns();
    let s = spec(serde_json::json!([
        {"name": "web.internal", "type": "A", "values": ["10.0.0.1"]},
        {"name": "www.internal", "type": "CNAME", "values": ["web.internal"]}
    ]));
    let changes = converge(&d, &s).await;
    let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert!(
        shown.contains(&"+ record web.internal A".to_string()),
        "{shown:?}"
    );
    assert!(shown.contains(&"+ record www.internal CNAME".to_string()));
    assert!(shown.contains(&"+ process dnsmasq".to_string()));
    assert!(pending(&d, &s).await.is_empty());
    assert_eq!(d.driver().snapshot().restarts, 1);
}

#[tokio::test]
async fn address_change_rewrites_hosts_without_restart() {
    let d = dns();
    let mut s =
        spec(serde_json::json!([{"name": "web.internal", "type": "A", "values": ["10.0.0.1"]}]));
    converge(&d, &s).await;
    s.records[0].values = vec!["10.0.0.2".into()];
    let p = pending(&d, &s).await;
    assert_eq!(p.actions.len(), 1, "{:?}", p.actions);
    assert!(matches!(p.actions[0], Action::WriteHosts(_)));
    assert_eq!(p.changes[0].to_string(), "~ record web.internal A");
    converge(&d, &s).await;
    assert_eq!(d.driver().snapshot().restarts, 1);
}

#[tokio::test]
async fn config_change_restarts_once_and_cleans_old_config() {
    let d = dns();
    let mut s = spec(
        serde_json::json!([{"name": "w.internal", "type": "CNAME", "values": ["a.internal"]}]),
    );
    converge(&d, &s).await;
    s.records[0].values = vec!["b.internal".into()];
    s.ttl = 30;
    converge(&d, &s).await;
    let snap = d.driver().snapshot();
    assert_eq!(snap.restarts, 2);
    assert_eq!(snap.confs.len(), 1);
    assert!(pending(&d, &s).await.is_empty());
}

#[tokio::test]
async fn hand_edits_and_dead_process_are_repaired() {
    let d = dns();
    let s =
        spec(serde_json::json!([{"name": "web.internal", "type": "A", "values": ["10.0.0.1"]}]));
    converge(&d, &s).await;
    d.driver().state.lock().unwrap().hosts = Some("# edited\n10.0.0.1 web.internal\n".into());
    let p = pending(&d, &s).await;
    assert_eq!(p.changes[0].to_string(), "~ file drifted");
    converge(&d, &s).await;
    d.driver().state.lock().unwrap().running.clear();
    let p = pending(&d, &s).await;
    assert!(p
        .actions
        .iter()
        .any(|a| matches!(a, Action::Restart { .. })));
    converge(&d, &s).await;
    assert!(pending(&d, &s).await.is_empty());
}

#[tokio::test]
async fn failed_config_write_skips_restart_and_reports_both() {
    let d = dns();
    let s = spec(serde_json::json!([]));
    d.driver().state.lock().unwrap().fail_restart = true;
    let obs = d.observe(&s).await.unwrap();
    let out = d.apply(d.plan(&s, &obs, &Facts::default())).await;
    let failed: Vec<_> = out.iter().filter(|o| o.error.is_some()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].object, "process dnsmasq");
    // The hosts file was still written: one failing object does not block the others.
    assert!(d.driver().snapshot().hosts.is_some());
}

fn arb_records() -> impl Strategy<Value = Vec<Record>> {
    let rec = (
        0u8..6,
        0u8..4,
        proptest::collection::vec(1u8..5, 1..3),
        proptest::option::of(1u32..100),
    )
        .prop_map(|(n, k, vals, ttl)| {
            let kind = [
                RecordType::A,
                RecordType::AAAA,
                RecordType::TXT,
                RecordType::SRV,
            ][k as usize];
            let values = vals
                .iter()
                .map(|v| match kind {
                    RecordType::A => format!("10.0.0.{v}"),
                    RecordType::AAAA => format!("fd00::{v}"),
                    RecordType::TXT => format!("text {v}"),
                    _ => format!("{v} 1 80{v} t{v}.internal"),
                })
                .collect();
            let ttl = matches!(kind, RecordType::A | RecordType::AAAA)
                .then_some(ttl)
                .flatten();
            Record {
                name: format!("n{n}.internal"),
                kind,
                values,
                container: None,
                ttl,
            }
        });
    proptest::collection::vec(rec, 0..8).prop_map(|mut v| {
        v.sort_by_key(|r| (r.name.clone(), r.kind));
        v.dedup_by_key(|r| (r.name.clone(), r.kind));
        v
    })
}

proptest! {
    /// plan(spec, apply(plan(spec, s))) is empty, starting from any earlier spec.
    #[test]
    fn idempotent_from_any_previous_state(before in arb_records(), after in arb_records()) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let d = dns();
            let mut s = spec(serde_json::json!([]));
            s.records = before;
            converge(&d, &s).await;
            s.records = after;
            converge(&d, &s).await;
            let p = pending(&d, &s).await;
            prop_assert!(p.is_empty(), "not converged: {:?}", p.changes);
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn a_record_whose_container_has_no_address_waits_in_the_plan() {
    let d = dns();
    let s = spec(serde_json::json!([
        {"name": "api.internal", "type": "A", "container": "api"},
        {"name": "web.internal", "type": "A", "values": ["10.0.0.1"]}
    ]));
    let p = pending(&d, &s).await;
    let shown: Vec<String> = p.waiting.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        shown,
        vec!["~ record api.internal A (waiting for container api to be reported)"]
    );
    // Once the container is known with an address, nothing waits.
    let mut facts = Facts::default();
    facts.containers.insert(
        "api".into(),
        converge_core::ContainerFacts {
            addresses: vec!["10.88.0.5".parse().unwrap()],
            running: true,
        },
    );
    let obs = d.observe(&s).await.unwrap();
    assert!(d.plan(&s, &obs, &facts).waiting.is_empty());
    // Known but without an IPv4 address: waiting for its address.
    facts.containers.get_mut("api").unwrap().addresses.clear();
    let w = d.plan(&s, &obs, &facts).waiting;
    assert_eq!(w[0].reason, "waiting for container api's address");
}
