//! The backups reconciler's glue: observe the record, repositories and runs in
//! progress; plan (see `plan`); apply. A backup, restore or export is recorded as
//! started (durably) and then runs in a background task, so a multi-hour borg run
//! never holds up the engine's pass loop; its end is recorded durably and triggers a
//! pass through `host_events`. One-shot commands (`converge apply`) run it in the pass.

use crate::driver::borg::Progress;
use crate::driver::BackupsDriver;
use crate::plan::{
    key, plan, Action, InitFailure, Observed, RunRecord, RunStatus, Running, ScheduleState,
    Started, State,
};
use crate::spec::BackupsSpec;
use chrono::{DateTime, Utc};
use converge_core::{
    DriverError, Facts, HostEvent, ObjectNote, ObjectOutcome, Plan, Reconciler, Retry,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::{error, info, info_span, Instrument};

struct Job {
    repository: String,
    progress: Progress,
}

struct Shared<D> {
    driver: D,
    /// Runs in progress in this process, by object key.
    running: Mutex<BTreeMap<String, Job>>,
    /// Failed `borg init`s by repository (retried on their own delay, see the plan).
    init_failures: Mutex<BTreeMap<String, InitFailure>>,
    /// Serialises read-modify-write of the record (passes and finishing tasks).
    record: Mutex<()>,
    events: mpsc::UnboundedSender<HostEvent>,
}

impl<D: BackupsDriver> Shared<D> {
    fn update(&self, f: impl FnOnce(&mut State)) -> Result<(), DriverError> {
        let _g = self.record.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = self.driver.read_state()?;
        f(&mut s);
        self.driver.write_state(&s)
    }
}

/// The backups reconciler over a driver.
pub struct Backups<D> {
    shared: Arc<Shared<D>>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<HostEvent>>>,
    background: bool,
}

impl<D: BackupsDriver> Backups<D> {
    /// `background`: long runs go to their own task (the agent); otherwise the pass
    /// waits for them (one-shot commands, which exit after the pass).
    pub fn new(driver: D, background: bool) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            shared: Arc::new(Shared {
                driver,
                running: Mutex::new(BTreeMap::new()),
                init_failures: Mutex::new(BTreeMap::new()),
                record: Mutex::new(()),
                events: tx,
            }),
            receiver: Mutex::new(Some(rx)),
            background,
        }
    }

    pub fn driver(&self) -> &D {
        &self.shared.driver
    }

    /// Whether any run is in progress (tests wait on it).
    pub fn busy(&self) -> bool {
        !self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Records the run started, then runs `work` (in the background in the agent) and
    /// records how it ended with `finish`.
    async fn start<F, T>(
        &self,
        object: String,
        repository: String,
        begin: impl FnOnce(&mut State),
        work: impl FnOnce(Arc<Shared<D>>, Progress) -> F + Send + 'static,
        finish: impl FnOnce(&mut State, Result<T, DriverError>, DateTime<Utc>) + Send + 'static,
    ) -> ObjectOutcome
    where
        F: Future<Output = Result<T, DriverError>> + Send + 'static,
        T: Send + 'static,
    {
        // Durably "started" before anything runs: a kill -9 from here on is seen by
        // the next agent as an interrupted run.
        if let Err(e) = self.shared.update(begin) {
            return ObjectOutcome::from_result(object, Err(e));
        }
        let progress = Progress::default();
        progress.set("starting".into());
        self.shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                object.clone(),
                Job {
                    repository,
                    progress: progress.clone(),
                },
            );
        let shared = self.shared.clone();
        let span = info_span!("backups", object = %object);
        let obj = object.clone();
        let background = self.background;
        let task = async move {
            let run = work(shared.clone(), progress);
            let result = if background {
                // Its own task: a panic in the run is recorded as a failed run.
                match tokio::spawn(run.in_current_span()).await {
                    Ok(r) => r,
                    Err(e) => Err(DriverError::Failed(format!("run aborted: {e}"))),
                }
            } else {
                // Inside the pass, so that dropping the pass stops the run (and its
                // borg) as a killed agent would.
                run.await
            };
            match &result {
                Ok(_) => info!("run finished"),
                Err(e) => error!(error = %e, "run failed"),
            }
            let now = shared.driver.now();
            let recorded = shared.update(|s| finish(s, result, now));
            if let Err(e) = recorded {
                error!(error = %e, "cannot record the end of the run");
            }
            shared
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&obj);
            let _ = shared.events.send(HostEvent(format!("{obj} finished")));
        }
        .instrument(span);
        if background {
            tokio::spawn(task);
        } else {
            task.await;
        }
        ObjectOutcome::ok(object)
    }
}

fn record(now: DateTime<Utc>) -> RunRecord {
    RunRecord {
        status: RunStatus::Started,
        started: now,
        finished: None,
        message: String::new(),
        url: None,
        expires_at: None,
    }
}

fn ended(r: &mut RunRecord, ok: bool, message: String, now: DateTime<Utc>) {
    r.status = if ok {
        RunStatus::Done
    } else {
        RunStatus::Failed
    };
    r.finished = Some(now);
    r.message = message;
}

impl<D: BackupsDriver> Reconciler for Backups<D> {
    type Spec = BackupsSpec;
    type Observed = Observed;
    type Action = Action;

    fn name(&self) -> &'static str {
        "backups"
    }

    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
        let rx = self
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(tokio_stream_from(rx))
    }

    async fn observe(&self, spec: &BackupsSpec) -> Result<Observed, DriverError> {
        let d = &self.shared.driver;
        let mut state = d.read_state()?;
        // Objects no longer in the document keep their record on disk (an id never runs
        // twice) but leave the status.
        state
            .schedules
            .retain(|name, _| spec.schedules.iter().any(|s| s.name == *name));
        state
            .restores
            .retain(|id, _| spec.restores.iter().any(|r| r.id == *id));
        state
            .exports
            .retain(|id, _| spec.exports.iter().any(|e| e.id == *id));
        let mut repositories = BTreeMap::new();
        for r in &spec.repositories {
            if r.kind == crate::spec::RepositoryKind::Borg {
                repositories.insert(r.name.clone(), d.repository(r, &state)?);
            }
        }
        let running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, j)| {
                (
                    k.clone(),
                    Running {
                        repository: j.repository.clone(),
                        progress: j.progress.get(),
                    },
                )
            })
            .collect();
        let init_failures = self
            .shared
            .init_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(Observed {
            now: d.now(),
            agent_start: d.agent_start(),
            state,
            repositories,
            running,
            init_failures,
            journaled_restores: d.journaled_restores(),
        })
    }

    fn plan(&self, spec: &BackupsSpec, observed: &Observed, facts: &Facts) -> Plan<Action> {
        let mut p = plan(spec, observed, facts);
        // Delays are in the driver's time; the engine sleeps in real time.
        let scale = self.shared.driver.time_scale();
        if scale > 1 {
            p.requeue_after = p.requeue_after.map(|d| d / scale);
            for w in &mut p.waiting {
                w.retry_after = w.retry_after.map(|d| d / scale);
            }
        }
        p
    }

    /// Schedules on record.
    fn owned(&self, o: &Observed) -> Option<u64> {
        Some(o.state.schedules.len() as u64)
    }

    fn notes(&self, o: &Observed) -> Vec<ObjectNote> {
        let mut notes = Vec::new();
        let fmt = |r: &RunRecord| {
            let when = r.finished.unwrap_or(r.started).format("%Y-%m-%dT%H:%M:%SZ");
            let mut s = format!("{} at {when}", format!("{:?}", r.status).to_lowercase());
            if !r.message.is_empty() {
                s.push_str(": ");
                s.push_str(&r.message);
            }
            if let (Some(u), Some(x)) = (&r.url, &r.expires_at) {
                s.push_str(&format!(
                    "; url {u} (expires {})",
                    x.format("%Y-%m-%dT%H:%M:%SZ")
                ));
            }
            s
        };
        for (name, s) in &o.state.schedules {
            if let Some(r) = &s.last {
                notes.push(ObjectNote {
                    object: format!("schedule {name}"),
                    note: format!("last run {}", fmt(r)),
                });
            }
        }
        for (id, r) in &o.state.restores {
            notes.push(ObjectNote {
                object: format!("restore {id}"),
                note: fmt(r),
            });
        }
        for (id, r) in &o.state.exports {
            notes.push(ObjectNote {
                object: format!("export {id}"),
                note: fmt(r),
            });
        }
        for (k, r) in &o.running {
            notes.push(ObjectNote {
                object: k.clone(),
                note: format!("running: {}", r.progress),
            });
        }
        notes
    }

    async fn apply(&self, plan: Plan<Action>) -> Vec<ObjectOutcome> {
        let mut outcomes = Vec::with_capacity(plan.actions.len());
        for action in plan.actions {
            let outcome = match action {
                Action::Init(r) => {
                    let span = info_span!("repository", name = %r.name);
                    let res = self
                        .shared
                        .driver
                        .init(&r)
                        .instrument(span)
                        .await
                        .and_then(|()| {
                            self.shared.update(|s| {
                                s.initialised.insert(r.name.clone());
                            })
                        });
                    let object = format!("repository {}", r.name);
                    let mut failures = self
                        .shared
                        .init_failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    match res {
                        Ok(()) => {
                            failures.remove(&r.name);
                            ObjectOutcome::ok(object)
                        }
                        // Retried on this repository's own delay, not in a loop.
                        Err(e) => {
                            let attempts = failures.get(&r.name).map_or(0, |f| f.attempts) + 1;
                            let f = InitFailure {
                                message: e.to_string(),
                                at: self.shared.driver.now(),
                                attempts,
                            };
                            error!(repository = %r.name, error = %e, attempts, retry_in = ?f.delay(), "borg init failed");
                            let mut outcome = ObjectOutcome::failed(object, &e);
                            outcome.retry = Retry::After(f.delay());
                            failures.insert(r.name.clone(), f);
                            outcome
                        }
                    }
                }
                Action::Baseline { schedule, since } => {
                    let res = self.shared.update(|s| {
                        s.schedules
                            .entry(schedule.clone())
                            .or_insert(ScheduleState {
                                since,
                                last_slot: None,
                                started: None,
                                last: None,
                                last_success: None,
                            });
                    });
                    ObjectOutcome::from_result(key("schedule", &schedule), res)
                }
                Action::Skip {
                    schedule,
                    slot,
                    why,
                } => {
                    info!(schedule = %schedule, slot = %slot, why = %why, "slot skipped");
                    let now = self.shared.driver.now();
                    let res = self.shared.update(|s| {
                        if let Some(st) = s.schedules.get_mut(&schedule) {
                            st.last_slot = Some(st.last_slot.map_or(slot, |l| l.max(slot)));
                            st.started = None;
                            st.last = Some(RunRecord {
                                status: RunStatus::Skipped,
                                started: now,
                                finished: Some(now),
                                message: format!(
                                    "slot {} skipped: {why}",
                                    slot.format("%Y-%m-%dT%H:%MZ")
                                ),
                                url: None,
                                expires_at: None,
                            });
                        }
                    });
                    ObjectOutcome::from_result(key("schedule", &schedule), res)
                }
                Action::Backup(run) => {
                    let now = self.shared.driver.now();
                    let name = run.schedule.name.clone();
                    let (slot, attempt) = (run.slot, run.attempt);
                    info!(schedule = %name, archive = %run.archive, attempt, "backup starting");
                    let n2 = name.clone();
                    self.start(
                        key("schedule", &name),
                        run.repository.name.clone(),
                        move |s| {
                            if let Some(st) = s.schedules.get_mut(&n2) {
                                st.started = Some(Started {
                                    slot,
                                    at: now,
                                    attempt,
                                });
                            }
                        },
                        move |sh, progress| async move { sh.driver.backup(&run, &progress).await },
                        move |s, res, end| {
                            if let Some(st) = s.schedules.get_mut(&name) {
                                st.last_slot = Some(st.last_slot.map_or(slot, |l| l.max(slot)));
                                st.started = None;
                                let mut r = record(now);
                                match res {
                                    Ok(m) => {
                                        ended(&mut r, true, m, end);
                                        st.last_success = Some(end);
                                    }
                                    Err(e) => ended(&mut r, false, e.to_string(), end),
                                }
                                st.last = Some(r);
                            }
                        },
                    )
                    .await
                }
                Action::Restore(r, repo) => {
                    let now = self.shared.driver.now();
                    let id = r.id.clone();
                    let (i1, i2) = (id.clone(), id.clone());
                    info!(restore = %id, archive = %r.archive, "restore starting");
                    self.start(
                        key("restore", &id),
                        repo.name.clone(),
                        move |s| {
                            s.restores.insert(i1, record(now));
                        },
                        move |sh, progress| async move { sh.driver.restore(&r, &repo, &progress).await },
                        move |s, res, end| {
                            if let Some(rec) = s.restores.get_mut(&i2) {
                                match res {
                                    Ok(m) => ended(rec, true, m, end),
                                    Err(e) => ended(rec, false, e.to_string(), end),
                                }
                            }
                        },
                    )
                    .await
                }
                Action::Export(e, repo) => {
                    let now = self.shared.driver.now();
                    let id = e.id.clone();
                    let (i1, i2) = (id.clone(), id.clone());
                    info!(export = %id, archive = %e.archive, "export starting");
                    self.start(
                        key("export", &id),
                        repo.name.clone(),
                        move |s| {
                            s.exports.insert(i1, record(now));
                        },
                        move |sh, progress| async move { sh.driver.export(&e, &repo, &progress).await },
                        move |s, res, end| {
                            if let Some(rec) = s.exports.get_mut(&i2) {
                                match res {
                                    Ok(done) => {
                                        ended(rec, true, done.message, end);
                                        rec.url = Some(done.url);
                                        rec.expires_at = Some(done.expires_at);
                                    }
                                    Err(e) => ended(rec, false, e.to_string(), end),
                                }
                            }
                        },
                    )
                    .await
                }
                Action::CleanRestore(id) => {
                    let res = self.shared.driver.clean_restore(&id).await;
                    let now = self.shared.driver.now();
                    let res = res.and_then(|c| {
                        self.shared.update(|s| {
                            if let Some(r) = s.restores.get_mut(&id) {
                                let message = if c.completed {
                                    c.message
                                } else {
                                    format!("{}; not run again: use a new id", c.message)
                                };
                                ended(r, c.completed, message, now);
                            }
                        })
                    });
                    ObjectOutcome::from_result(key("restore", &id), res)
                }
                Action::Interrupted { kind, id } => {
                    let now = self.shared.driver.now();
                    let res = self.shared.update(|s| {
                        let map = if kind == "restore" { &mut s.restores } else { &mut s.exports };
                        if let Some(r) = map.get_mut(&id) {
                            ended(r, false, "interrupted (the agent stopped during the run); not run again: use a new id".into(), now);
                        }
                    });
                    ObjectOutcome::from_result(key(kind, &id), res)
                }
            };
            outcomes.push(outcome);
        }
        outcomes
    }
}

/// The receiver as a stream (without pulling in tokio-stream).
fn tokio_stream_from(rx: mpsc::UnboundedReceiver<HostEvent>) -> BoxStream<'static, HostEvent> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }).boxed()
}

#[cfg(test)]
mod tests;
