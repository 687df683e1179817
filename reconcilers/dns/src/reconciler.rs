//! The DNS reconciler's glue: observe the files and processes through the driver, plan
//! (see `plan`), apply the writes and the one restart a pass may need.

use crate::driver::DnsDriver;
use crate::plan::{plan, Action, Observed};
use crate::spec::DnsSpec;
use converge_core::{DriverError, Facts, HostEvent, ObjectOutcome, Plan, Reconciler};
use tracing::info;

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

    /// Records served: hosts-file lines and the running configuration's record lines.
    fn owned(&self, observed: &Observed) -> Option<u64> {
        let hosts = observed.hosts.as_deref().unwrap_or_default();
        let hosts = hosts
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .count();
        let running = observed.running.first().map(|r| r.conf_hash.as_str());
        let conf = running.and_then(|h| observed.confs.get(h)).map_or(0, |c| {
            c.lines()
                .filter(|l| {
                    ["host-record=", "cname=", "txt-record=", "srv-host="]
                        .iter()
                        .any(|p| l.starts_with(p))
                })
                .count()
        });
        Some((hosts + conf) as u64)
    }

    /// A hand-edited or deleted file is repaired at once, not only at the next resync.
    fn host_events(&self) -> Option<futures::stream::BoxStream<'static, HostEvent>> {
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

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
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

#[cfg(test)]
mod tests;
