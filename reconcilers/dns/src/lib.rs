//! DNS reconciler: serves the document's service-discovery zone through a dnsmasq
//! instance that converge starts, configures and owns (files under its own directory).
//!
//! How each record type reaches dnsmasq, and what a change costs:
//! - A/AAAA with the zone TTL: a hosts file in `--hostsdir`, re-read by dnsmasq on
//!   inotify within milliseconds. No restart, no failed query.
//! - CNAME, TXT, SRV, A/AAAA with their own TTL, and the server settings (zone, listen,
//!   port, upstreams, ttl): dnsmasq reads these only from its configuration at start-up
//!   (SIGHUP re-reads hosts files, not configuration). converge writes them to a
//!   content-addressed config file and restarts dnsmasq once per pass, however many of
//!   them changed; a pass with no config change never restarts it.

pub mod driver;
pub mod render;
pub mod spec;

use converge_core::{Change, DriverError, Facts, FieldChange, ObjectOutcome, Op, Plan, Reconciler};
use driver::{DnsDriver, Running};
use render::{desired_served, desired_zone, parse, render};
use std::collections::BTreeMap;
use tracing::info;

pub use render::Layout;
pub use spec::{validate, DnsSpec, Record, RecordType};

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

/// The DNS reconciler over a driver.
pub struct Dns<D> {
    driver: D,
}

impl<D: DnsDriver> Dns<D> {
    pub fn new(driver: D) -> Self {
        Self { driver }
    }

    pub fn driver(&self) -> &D {
        &self.driver
    }
}

impl<D: DnsDriver> Reconciler for Dns<D> {
    type Spec = DnsSpec;
    type Observed = Observed;
    type Action = Action;

    fn name(&self) -> &'static str {
        "dns"
    }

    fn watches_facts(&self) -> bool {
        true
    }

    /// A hand-edited or deleted file is repaired at once, not only at the next resync.
    fn host_events(&self) -> Option<futures::stream::BoxStream<'static, ()>> {
        self.driver.file_events()
    }

    async fn observe(&self, _spec: &DnsSpec) -> Result<Observed, DriverError> {
        Ok(Observed {
            hosts: self.driver.read_hosts()?,
            confs: self.driver.read_confs()?,
            running: self.driver.running()?,
        })
    }

    fn plan(&self, spec: &DnsSpec, observed: &Observed, facts: &Facts) -> Plan<Action> {
        plan(spec, observed, facts, self.driver.layout())
    }

    async fn apply(&self, _spec: &DnsSpec, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::new();
        let mut conf_failed = false;
        for action in plan.actions {
            let outcome = match action {
                Action::WriteHosts(content) => {
                    info!(file = "converge.hosts", "writing hosts file");
                    ObjectOutcome::from_result(
                        "file converge.hosts",
                        self.driver.write_hosts(&content),
                    )
                }
                Action::WriteConf { hash, content } => {
                    info!(file = %format!("dnsmasq-{hash}.conf"), "writing config");
                    let r = self.driver.write_conf(&hash, &content);
                    conf_failed = r.is_err();
                    ObjectOutcome::from_result(format!("file dnsmasq-{hash}.conf"), r)
                }
                Action::Restart { hash, .. } if conf_failed => ObjectOutcome::failed(
                    "process dnsmasq",
                    format!("not restarted: config {hash} could not be written"),
                ),
                Action::Restart { old, hash } => {
                    info!(config = %hash, stopping = old.len(), "restarting dnsmasq");
                    ObjectOutcome::from_result(
                        "process dnsmasq",
                        self.driver.restart(&old, &hash).await,
                    )
                }
                Action::RemoveStaleConfs { keep } => ObjectOutcome::from_result(
                    "file dnsmasq-*.conf",
                    self.driver.remove_stale_confs(&keep),
                ),
            };
            outcomes.push(outcome);
        }
        outcomes
    }
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
    let mut plan = Plan::default();
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

#[cfg(test)]
mod tests;
