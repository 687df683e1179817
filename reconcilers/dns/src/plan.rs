//! The DNS plan: pure comparison of the rendered desired files and process against
//! what was observed, plus the records that wait for a container's address.

use crate::driver::Running;
use crate::render::{self, desired_served, desired_zone, parse, render, Layout};
use crate::spec::{DnsSpec, RecordType};
use converge_core::{Change, Facts, FieldChange, Op, Plan, Waiting};
use std::collections::BTreeMap;

/// What `observe` read: our files and our dnsmasq processes.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub hosts: Option<String>,
    pub confs: BTreeMap<String, String>,
    pub running: Vec<Running>,
}

/// One driver operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    WriteHosts(String),
    WriteConf {
        hash: String,
        content: String,
    },
    /// Stop `old` (possibly none) and start dnsmasq on config `hash`.
    Restart {
        old: Vec<Running>,
        hash: String,
    },
    RemoveStaleConfs {
        keep: String,
    },
}

/// Pure plan: compare rendered desired files and process against what was observed.
pub fn plan(spec: &DnsSpec, observed: &Observed, facts: &Facts, layout: &Layout) -> Plan<Action> {
    // What is served now: nothing unless exactly one instance of ours runs.
    let current = match observed.running.as_slice() {
        [one] => parse(
            observed.hosts.as_deref(),
            observed.confs.get(&one.conf_hash).map(String::as_str),
        ),
        _ => Default::default(),
    };
    let zone = desired_zone(spec, facts, &current.records);
    let want = render(spec, &zone, layout);
    let mut plan = Plan {
        waiting: waiting_records(spec, facts),
        ..Plan::default()
    };
    let desired = desired_served(spec, &zone);
    diff_served(&current, &desired, &mut plan.changes);

    let hosts_differ = observed.hosts.as_deref() != Some(want.hosts.as_str());
    if hosts_differ {
        plan.actions.push(Action::WriteHosts(want.hosts.clone()));
    }
    if observed.confs.get(&want.conf_hash) != Some(&want.conf) {
        plan.actions.push(Action::WriteConf {
            hash: want.conf_hash.clone(),
            content: want.conf.clone(),
        });
    }
    let restart = !matches!(observed.running.as_slice(), [one] if one.conf_hash == want.conf_hash);
    if restart {
        let mut change = Change::new(
            if observed.running.is_empty() {
                Op::Create
            } else {
                Op::Update
            },
            "process",
            "dnsmasq",
        );
        let old = observed
            .running
            .iter()
            .map(|r| r.conf_hash.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        change = change.with_field(FieldChange::new(
            "config",
            (!old.is_empty()).then_some(old),
            Some(want.conf_hash.clone()),
        ));
        plan.changes.push(change);
        plan.actions.push(Action::Restart {
            old: observed.running.clone(),
            hash: want.conf_hash.clone(),
        });
    }
    if observed.confs.keys().any(|h| *h != want.conf_hash) {
        plan.actions.push(Action::RemoveStaleConfs {
            keep: want.conf_hash.clone(),
        });
        if !restart {
            plan.changes
                .push(Change::new(Op::Delete, "file", "stale dnsmasq-*.conf"));
        }
    }
    // A file that differs while serving the same records was edited or deleted by hand.
    if plan.changes.is_empty() && !plan.actions.is_empty() {
        let mut c = Change::new(Op::Update, "file", "drifted");
        for a in &plan.actions {
            if let Action::WriteHosts(_) = a {
                c = c.with_field(FieldChange::new(
                    "converge.hosts",
                    None,
                    Some("rewrite".into()),
                ));
            }
            if let Action::WriteConf { hash, .. } = a {
                c = c.with_field(FieldChange::new(
                    format!("dnsmasq-{hash}.conf"),
                    None,
                    Some("rewrite".into()),
                ));
            }
        }
        plan.changes.push(c);
    }
    plan
}

/// Records that name a container which has no address of their family yet: shown by
/// `converge diff`, served once the containers reconciler reports the address.
fn waiting_records(spec: &DnsSpec, facts: &Facts) -> Vec<Waiting> {
    spec.records
        .iter()
        .filter_map(|r| {
            let c = r.container.as_ref()?;
            let id = format!("{} {}", r.name.trim_end_matches('.'), r.kind.as_str());
            let reason = match facts.containers.get(c) {
                None => format!("waiting for container {c} to be reported"),
                Some(f)
                    if !f
                        .addresses
                        .iter()
                        .any(|a| a.is_ipv4() == (r.kind == RecordType::A)) =>
                {
                    format!("waiting for container {c}'s address")
                }
                Some(_) => return None,
            };
            Some(Waiting::new("record", id, reason))
        })
        .collect()
}

fn diff_served(current: &render::Served, desired: &render::Served, out: &mut Vec<Change>) {
    for (k, want) in &desired.settings {
        let have = current.settings.get(k);
        if have != Some(want) {
            out.push(
                Change::new(
                    if have.is_some() {
                        Op::Update
                    } else {
                        Op::Create
                    },
                    "setting",
                    *k,
                )
                .with_field(FieldChange::new(
                    "value",
                    have.cloned(),
                    Some(want.clone()),
                )),
            );
        }
    }
    let id = |(name, kind): &(String, RecordType)| format!("{name} {}", kind.as_str());
    for (key, want) in &desired.records {
        match current.records.get(key) {
            None => out.push(
                Change::new(Op::Create, "record", id(key))
                    .with_field(FieldChange::new(
                        "values",
                        None,
                        Some(want.values.join(", ")),
                    ))
                    .with_field(FieldChange::new("ttl", None, Some(want.ttl.to_string()))),
            ),
            Some(have) if have != want => {
                let mut c = Change::new(Op::Update, "record", id(key));
                if have.values != want.values {
                    c = c.with_field(FieldChange::new(
                        "values",
                        Some(have.values.join(", ")),
                        Some(want.values.join(", ")),
                    ));
                }
                if have.ttl != want.ttl {
                    c = c.with_field(FieldChange::new(
                        "ttl",
                        Some(have.ttl.to_string()),
                        Some(want.ttl.to_string()),
                    ));
                }
                out.push(c);
            }
            Some(_) => {}
        }
    }
    for (key, have) in &current.records {
        if !desired.records.contains_key(key) {
            out.push(
                Change::new(Op::Delete, "record", id(key)).with_field(FieldChange::new(
                    "values",
                    Some(have.values.join(", ")),
                    None,
                )),
            );
        }
    }
}
