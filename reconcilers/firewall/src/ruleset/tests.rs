//! Unit tests of the pure table model: elements, encoding and display.

use super::*;
use converge_core::ContainerFacts;
use serde_json::json;

fn spec(v: serde_json::Value) -> FirewallSpec {
    serde_json::from_value(v).unwrap()
}

#[test]
fn published_ports_become_map_elements() {
    let s = spec(json!({"publishedPorts": [
        {"protocol": "tcp", "hostPort": 8080, "target": {"address": "10.0.0.2", "port": 80}},
        {"protocol": "udp", "hostPort": 53, "hostIp": "192.168.1.1",
         "target": {"address": "10.0.0.3", "port": 5353}},
        {"hostPort": 443, "target": {"address": "fd00::2", "port": 8443}}
    ]}));
    let d = desired(&s, &Facts::default());
    let e = &d.snapshot.elements;
    let any4: Vec<String> = e["dnat4_any"]
        .iter()
        .map(|(k, v)| format!("{} : {}", show_key(&DNAT4_ANY, k), show_data(&DNAT4_ANY, v)))
        .collect();
    assert_eq!(any4, ["ip tcp . 8080 : 10.0.0.2 . 80"]);
    let on4: Vec<String> = e["dnat4_on"]
        .iter()
        .map(|(k, v)| format!("{} : {}", show_key(&DNAT4_ON, k), show_data(&DNAT4_ON, v)))
        .collect();
    assert_eq!(on4, ["ip 192.168.1.1 . udp . 53 : 10.0.0.3 . 5353"]);
    assert_eq!(e["dnat6_any"].len(), 1);
    assert!(d.unresolved.is_empty());
}

#[test]
fn container_targets_resolve_through_facts_or_wait() {
    let s = spec(json!({"publishedPorts": [
        {"hostPort": 8080, "target": {"container": "web", "port": 80}}
    ]}));
    let d = desired(&s, &Facts::default());
    assert!(d.snapshot.elements["dnat4_any"].is_empty());
    assert_eq!(d.unresolved.len(), 1);
    let mut facts = Facts::default();
    facts.containers.insert(
        "web".into(),
        ContainerFacts {
            addresses: vec!["10.88.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            running: true,
        },
    );
    let d = desired(&s, &facts);
    assert_eq!(d.snapshot.elements["dnat4_any"].len(), 1);
    assert_eq!(d.snapshot.elements["dnat6_any"].len(), 1);
}

#[test]
fn allow_from_restricts_the_port_and_drops_contained_networks() {
    let s = spec(json!({"publishedPorts": [
        {"hostPort": 22, "target": {"address": "10.0.0.2", "port": 22},
         "allowFrom": ["10.0.0.0/8", "10.1.0.0/16", "fd00::/8"]}
    ]}));
    let d = desired(&s, &Facts::default());
    let e = &d.snapshot.elements;
    assert_eq!((e["restricted4"].len(), e["restricted6"].len()), (1, 1));
    let allow4: Vec<String> = e["allow4"].keys().map(|k| show_key(&ALLOW4, k)).collect();
    assert_eq!(allow4, ["ip 10.0.0.0/8 . tcp . 22"]);
    let allow6: Vec<String> = e["allow6"].keys().map(|k| show_key(&ALLOW6, k)).collect();
    assert_eq!(allow6, ["ip6 fd00::/8 . tcp . 22"]);
}

#[test]
fn allow_from_restricts_only_the_families_it_is_published_on() {
    // The same port published on an IPv4 address with allowFrom and on an IPv6 address
    // without: IPv6 clients stay unrestricted.
    let s = spec(json!({"publishedPorts": [
        {"hostPort": 22, "hostIp": "192.168.1.1", "target": {"address": "10.0.0.2", "port": 22},
         "allowFrom": ["10.0.0.0/8"]},
        {"hostPort": 22, "hostIp": "fd00::1", "target": {"address": "fd00::2", "port": 22}}
    ]}));
    let mut problems = converge_core::Problems::default();
    crate::validate(&s, "$.firewall", &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let e = desired(&s, &Facts::default()).snapshot.elements;
    assert_eq!((e["restricted4"].len(), e["restricted6"].len()), (1, 0));
    assert_eq!((e["allow4"].len(), e["allow6"].len()), (1, 0));
}

#[test]
fn filter_rules_expand_per_family_and_any_is_a_full_range() {
    let s = spec(json!({"input": {"policy": "drop", "allow": [
        {"protocol": "tcp", "ports": [22, 80]},
        {"from": ["192.168.0.0/16"]}
    ]}}));
    let d = desired(&s, &Facts::default());
    let in4: Vec<String> = d.snapshot.elements["input4"]
        .keys()
        .map(|k| show_key(&INPUT4, k))
        .collect();
    assert_eq!(
        in4,
        [
            "ip any . any . tcp . 22",
            "ip any . any . tcp . 80",
            "ip 192.168.0.0/16 . any . any . any"
        ]
    );
    // The second rule names only IPv4 networks: nothing for IPv6.
    assert_eq!(d.snapshot.elements["input6"].len(), 2);
    assert!(d.snapshot.structure.chains.contains_key("input"));
    assert!(!d.snapshot.structure.chains.contains_key("forward"));
}

#[test]
fn structure_does_not_depend_on_the_ports() {
    let a = desired(&FirewallSpec::default(), &Facts::default());
    let b = desired(
        &spec(json!({"publishedPorts": [
            {"hostPort": 1, "target": {"address": "10.0.0.2", "port": 1}, "allowFrom": ["10.0.0.0/8"]}
        ]})),
        &Facts::default(),
    );
    assert_eq!(a.snapshot.structure, b.snapshot.structure);
}

#[test]
fn element_messages_are_chunked_under_the_attribute_limit() {
    let elems: Elements = (1..=10_000u16)
        .map(|p| {
            (
                key(&[&[6], &p.to_be_bytes()]),
                key(&[&[10, 0, 0, 2], &80u16.to_be_bytes()]),
            )
        })
        .collect();
    let msgs = element_messages(&DNAT4_ANY, elems.iter(), true);
    assert!(msgs.len() > 1);
    assert!(msgs.iter().all(|m| m.attrs.len() < 65_000));
    let mut back = Elements::new();
    for m in &msgs {
        parse_elements(&m.attrs, &mut back);
    }
    assert_eq!(back, elems);
}

#[test]
fn rule_tags_change_with_the_expressions() {
    let (_, _, a) = structure(&FirewallSpec::default());
    let (_, _, b) = structure(&spec(json!({"masquerade": true})));
    assert!(a.iter().all(|r| r.tag.starts_with("converge: ")));
    assert_eq!(b.len(), a.len() + 1);
    let tags: std::collections::BTreeSet<_> = a.iter().map(|r| &r.tag).collect();
    assert!(
        tags.len() >= 6,
        "identical rules in different chains still differ"
    );
}

#[test]
fn rustables_encodes_table_and_chains() {
    let (chains, _, _) = structure(&FirewallSpec::default());
    let msgs = nfnl::table_and_chains(TABLE, &chains, true);
    assert_eq!(msgs.len(), 3 + chains.len());
    assert_eq!(msgs[1].ty, msg::DELTABLE);
    let (name, state) = parse_chain(&msgs[3].attrs).unwrap();
    assert_eq!(name, "prerouting");
    assert_eq!(state.hook, Some(PREROUTING));
}
