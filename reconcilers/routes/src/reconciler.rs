//! The routes reconciler's glue: observe Caddy (process, configuration + ETag, secrets,
//! upstreams), plan (see `plan`), apply the pass's one configuration change — narrowed
//! down to the refused routes when Caddy refuses it.

use crate::driver::{CaddyDriver, LoadError};
use crate::plan::{self, splice, Action, Load, Observed, OwnedRoute, Process};
use crate::spec::{RoutesInput, TlsMode};
use converge_core::{
    DriverError, Facts, FactsUpdate, HostEvent, ObjectNote, ObjectOutcome, Plan, Reconciler, Retry,
};
use std::collections::BTreeMap;
use tracing::{info, info_span, warn, Instrument};

/// How often, and how far apart, observe asks a running Caddy for its configuration
/// before concluding its admin endpoint is gone (about 3 s in all).
const ADMIN_ATTEMPTS: u32 = 15;
const ADMIN_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// The routes reconciler over a driver.
pub struct Routes<D> {
    driver: D,
}

impl<D: CaddyDriver> Routes<D> {
    pub fn new(driver: D) -> Self {
        Self { driver }
    }

    pub fn driver(&self) -> &D {
        &self.driver
    }

    /// Sends `load`; when Caddy refuses it, narrows the refusal down to routes by
    /// bisection over the changed routes (each attempt is one guarded change Caddy
    /// rolls back on error), applies the rest and reports each refused route with
    /// Caddy's error.
    async fn load(&self, load: Load) -> Vec<ObjectOutcome> {
        let objects = |names: &[String]| -> Vec<String> {
            if names.is_empty() {
                vec!["config caddy".to_string()]
            } else {
                names.iter().map(|n| format!("route {n}")).collect()
            }
        };
        info!(
            changed = load.changed.len(),
            "one caddy configuration change"
        );
        let first = self.driver.load(&load.config, load.etag.as_deref()).await;
        let refusal = match first {
            Ok(()) => {
                for n in &load.changed {
                    info_span!("route", name = %n).in_scope(|| info!("applied"));
                }
                return objects(&load.changed)
                    .into_iter()
                    .map(ObjectOutcome::ok)
                    .collect();
            }
            Err(LoadError::Driver(e)) => {
                if matches!(e, DriverError::Transient(_)) {
                    warn!(error = %e, "caddy configuration changed concurrently");
                }
                let retry = e.retry();
                let msg = e.to_string();
                return objects(&load.changed)
                    .into_iter()
                    .map(|o| ObjectOutcome {
                        object: o,
                        error: Some(msg.clone()),
                        retry,
                    })
                    .collect();
            }
            Err(LoadError::Refused(m)) => m,
        };
        if load.changed.len() <= 1 {
            return objects(&load.changed)
                .into_iter()
                .map(|o| {
                    warn!(object = %o, error = %refusal, "caddy refused");
                    ObjectOutcome::failed(o, format!("caddy refused: {refusal}"))
                })
                .collect();
        }
        warn!(error = %refusal, "caddy refused the change; narrowing it down");
        self.narrow(load).await
    }

    async fn narrow(&self, load: Load) -> Vec<ObjectOutcome> {
        let Load {
            base,
            mut etag,
            mut current,
            desired,
            changed,
            ..
        } = load;
        let mut outcomes = Vec::new();
        let mut queue: Vec<Vec<String>> = vec![];
        let mid = changed.len() / 2;
        queue.push(changed[mid..].to_vec());
        queue.push(changed[..mid].to_vec());
        while let Some(set) = queue.pop() {
            let mut candidate: BTreeMap<String, OwnedRoute> = current.clone();
            for n in &set {
                match desired.get(n) {
                    Some(r) => candidate.insert(n.clone(), r.clone()),
                    None => candidate.remove(n),
                };
            }
            let config = splice(&base, &candidate);
            match self.driver.load(&config, etag.as_deref()).await {
                Ok(()) => {
                    current = candidate;
                    outcomes.extend(set.iter().map(|n| ObjectOutcome::ok(format!("route {n}"))));
                    // The next attempt is guarded by the ETag of what we just loaded;
                    // if it is not ours any more, someone else changed it: stop here.
                    match self.driver.get_config().await {
                        Ok(c) if c.value == config => etag = c.etag,
                        other => {
                            let why = match other {
                                Err(e) => e.to_string(),
                                Ok(_) => {
                                    "caddy's configuration was changed by someone else meanwhile"
                                        .into()
                                }
                            };
                            for rest in queue.drain(..).flatten() {
                                outcomes.push(ObjectOutcome {
                                    object: format!("route {rest}"),
                                    error: Some(why.clone()),
                                    retry: Retry::Soon,
                                });
                            }
                        }
                    }
                }
                Err(LoadError::Refused(m)) if set.len() == 1 => {
                    info_span!("route", name = %set[0])
                        .in_scope(|| warn!(error = %m, "caddy refused the route"));
                    outcomes.push(ObjectOutcome::failed(
                        format!("route {}", set[0]),
                        format!("caddy refused: {m}"),
                    ));
                }
                Err(LoadError::Refused(_)) => {
                    let mid = set.len() / 2;
                    queue.push(set[mid..].to_vec());
                    queue.push(set[..mid].to_vec());
                }
                Err(LoadError::Driver(e)) => {
                    let retry = e.retry();
                    for n in set
                        .iter()
                        .chain(queue.drain(..).flatten().collect::<Vec<_>>().iter())
                    {
                        outcomes.push(ObjectOutcome {
                            object: format!("route {n}"),
                            error: Some(e.to_string()),
                            retry,
                        });
                    }
                }
            }
        }
        outcomes
    }
}

impl<D: CaddyDriver> Reconciler for Routes<D> {
    type Spec = RoutesInput;
    type Observed = Observed;
    type Action = Action;

    fn name(&self) -> &'static str {
        "routes"
    }

    /// Container upstreams follow the containers reconciler's addresses.
    fn watches_facts(&self) -> bool {
        true
    }

    /// The upstream addresses Caddy dials, so that a container replaced behind a route
    /// is stopped only once the route points at its successor.
    fn publish(&self, observed: &Observed) -> Option<FactsUpdate> {
        let addresses = observed
            .config
            .as_ref()
            .map(|c| plan::dialed(&c.value))
            .unwrap_or_default();
        Some(FactsUpdate::InUse {
            consumer: "routes".into(),
            addresses,
        })
    }

    /// Caddy exiting is repaired at once (restarted, routes restored).
    fn host_events(&self) -> Option<futures::stream::BoxStream<'static, HostEvent>> {
        self.driver.events()
    }

    async fn observe(&self, input: &RoutesInput) -> Result<Observed, DriverError> {
        let process = self.driver.process()?;
        let mut attempt = 0;
        let config = loop {
            attempt += 1;
            match (self.driver.get_config().await, &process) {
                (Ok(c), _) => break Some(c),
                // Not running: start it.
                (Err(e), Process::Managed { pids, missing, .. }) if pids.is_empty() || *missing => {
                    info!(error = %e, running = pids.len(), "caddy is not running");
                    break None;
                }
                // Caddy replaces its admin listener on every configuration load, so a
                // running Caddy may briefly not answer: ask again before concluding
                // its admin endpoint is gone (Caddy < 2.7 after a full wipe), which
                // is repaired by restarting it.
                (Err(e), Process::Managed { pids, .. }) if attempt >= ADMIN_ATTEMPTS => {
                    warn!(error = %e, running = pids.len(), "caddy runs but its admin API does not answer: restarting it");
                    break None;
                }
                (Err(e), Process::External) if attempt >= ADMIN_ATTEMPTS => return Err(e),
                (Err(_), _) => tokio::time::sleep(ADMIN_RETRY).await,
            }
        };
        let mut secrets = BTreeMap::new();
        for r in input
            .spec
            .routes
            .iter()
            .filter(|r| r.tls == TlsMode::Certificate)
        {
            for name in [&r.certificate_secret, &r.key_secret].into_iter().flatten() {
                if let Some(v) = self.driver.read_secret(name)? {
                    secrets.insert(name.clone(), plan::Secret(v));
                }
            }
        }
        let upstreams = if config.is_some() {
            self.driver.upstreams().await.unwrap_or_else(|e| {
                info!(error = %e, "caddy upstreams not available");
                Vec::new()
            })
        } else {
            Vec::new()
        };
        Ok(Observed {
            process,
            config,
            secrets,
            upstreams,
            stream_close_delay: self.driver.stream_close_delay(),
            load_hold: self.driver.load_hold(),
        })
    }

    fn plan(&self, input: &RoutesInput, observed: &Observed, facts: &Facts) -> Plan<Action> {
        plan::plan(input, observed, facts)
    }

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::new();
        let mut started = true;
        for action in plan.actions {
            match action {
                Action::Start { stop } => {
                    let r = self
                        .driver
                        .start(&stop)
                        .instrument(info_span!("caddy start", stopping = stop.len()))
                        .await;
                    started = r.is_ok();
                    if let Err(e) = &r {
                        warn!(error = %e, "caddy did not start");
                    }
                    outcomes.push(ObjectOutcome::from_result("process caddy", r));
                }
                Action::Redirect => {
                    let r = self
                        .driver
                        .redirect()
                        .instrument(info_span!("caddy redirect"))
                        .await;
                    if let Err(e) = &r {
                        warn!(error = %e, "caddy redirect not restored");
                    }
                    outcomes.push(ObjectOutcome::from_result("redirect caddy", r));
                }
                Action::Load(_) if !started => {}
                Action::Load(load) => {
                    let span = info_span!("caddy load", changed = load.changed.len());
                    // The routes this change leaves as they were stay in force: counted,
                    // so a status says how many routes serve beside the ones refused.
                    let unchanged: Vec<ObjectOutcome> = load
                        .desired
                        .keys()
                        .filter(|n| !load.changed.contains(n))
                        .map(|n| ObjectOutcome::ok(format!("route {n}")))
                        .collect();
                    outcomes.extend(self.load(*load).instrument(span).await);
                    outcomes.extend(unchanged);
                }
            }
        }
        outcomes
    }

    /// converge's routes in the serving Caddy's configuration.
    fn owned(&self, observed: &Observed) -> Option<u64> {
        Some(
            observed
                .config
                .as_ref()
                .map_or(0, |c| plan::extract(&c.value).len() as u64),
        )
    }

    fn notes(&self, observed: &Observed) -> Vec<ObjectNote> {
        plan::notes(observed)
    }
}

#[cfg(test)]
mod tests;
