//! The reconcile engine: one isolated tokio task per reconciler, kube-runtime style.
//!
//! Triggers: a new document, a change in the shared observed facts (for reconcilers
//! that watch them), host events, a jittered periodic resync (drift repair) and
//! backoff retries. A task runs one pass at a time (single flight); documents that
//! arrive meanwhile coalesce in a `watch` channel, so only the newest is applied next.
//! Each pass runs in its own spawned task, so a panic is contained and reported.

use crate::document::Document;
use chrono::{DateTime, Utc};
use converge_core::{Change, Facts, FactsUpdate, ObjectNote, ObjectOutcome, Reconciler};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

/// Coarse state of one reconciler, as reported to the operator and control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// No pass has finished yet: no document so far, or its first pass is running.
    Pending,
    /// Host matches the document's section.
    Converged,
    /// Working on a new generation (or verifying the last apply).
    Progressing,
    /// The last pass failed or some objects could not be converged; retrying.
    Degraded,
    /// The document has no section for this reconciler: nothing is managed.
    Unmanaged,
}

/// One object the last pass could not converge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectError {
    pub object: String,
    pub error: String,
}

/// Status of one reconciler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcilerStatus {
    pub reconciler: String,
    pub state: State,
    pub message: String,
    /// Generation of the document the last completed pass worked from.
    pub observed_generation: Option<u64>,
    pub last_transition: DateTime<Utc>,
    pub last_pass: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub object_errors: Vec<ObjectError>,
    /// Notes about objects that are not failures (restarts, health).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<ObjectNote>,
}

impl ReconcilerStatus {
    /// The status of a reconciler before its first pass.
    pub fn pending(reconciler: &str) -> Self {
        Self {
            reconciler: reconciler.to_string(),
            state: State::Pending,
            message: "waiting for its first pass".into(),
            observed_generation: None,
            last_transition: Utc::now(),
            last_pass: None,
            object_errors: Vec::new(),
            objects: Vec::new(),
        }
    }
}

/// Result of one pass of one reconciler.
#[derive(Debug)]
pub enum PassResult {
    /// The document has no section for this reconciler.
    Unmanaged,
    /// The pass ran: planned `changes`; `outcomes` of the applied actions (empty on a
    /// dry run or an empty plan); facts to publish.
    Ran {
        changes: Vec<Change>,
        outcomes: Vec<ObjectOutcome>,
        facts: Option<FactsUpdate>,
        notes: Vec<ObjectNote>,
    },
    /// Observing the host failed (or the pass panicked / timed out): nothing applied.
    Failed(String),
}

/// A reconciler bound to its section of the document, with its types erased so the
/// engine can hold all of them in one list.
pub trait Section: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn watches_facts(&self) -> bool;
    fn host_events(&self) -> Option<BoxStream<'static, ()>>;
    fn pass(
        &self,
        doc: Arc<Document>,
        facts: Arc<Facts>,
        dry_run: bool,
    ) -> BoxFuture<'static, PassResult>;
}

/// Adapter from a typed [`Reconciler`] plus a section selector to a [`Section`].
pub struct Bound<R: Reconciler> {
    reconciler: Arc<R>,
    select: fn(&Document) -> Option<&R::Spec>,
    observe_timeout: Duration,
    apply_timeout: Duration,
}

impl<R: Reconciler> Bound<R> {
    pub fn new(reconciler: R, select: fn(&Document) -> Option<&R::Spec>) -> Self {
        Self {
            reconciler: Arc::new(reconciler),
            select,
            observe_timeout: Duration::from_secs(30),
            apply_timeout: Duration::from_secs(300),
        }
    }
}

impl<R: Reconciler> Section for Bound<R> {
    fn name(&self) -> &'static str {
        self.reconciler.name()
    }

    fn watches_facts(&self) -> bool {
        self.reconciler.watches_facts()
    }

    fn host_events(&self) -> Option<BoxStream<'static, ()>> {
        self.reconciler.host_events()
    }

    fn pass(
        &self,
        doc: Arc<Document>,
        facts: Arc<Facts>,
        dry_run: bool,
    ) -> BoxFuture<'static, PassResult> {
        let r = self.reconciler.clone();
        let select = self.select;
        let (observe_timeout, apply_timeout) = (self.observe_timeout, self.apply_timeout);
        let span = tracing::info_span!(
            "reconcile",
            reconciler = r.name(),
            generation = doc.generation,
            dry_run
        );
        Box::pin(
            async move {
                let Some(spec) = select(&doc) else {
                    return PassResult::Unmanaged;
                };
                let observed = match tokio::time::timeout(observe_timeout, r.observe(spec)).await {
                    Ok(Ok(o)) => o,
                    Ok(Err(e)) => return PassResult::Failed(format!("observe: {e}")),
                    Err(_) => {
                        return PassResult::Failed(format!(
                            "observe timed out after {observe_timeout:?}"
                        ))
                    }
                };
                let published = r.publish(&observed);
                let notes = r.notes(&observed);
                let plan = r.plan(spec, &observed, &facts);
                // Released before apply: a reconciler may update its cached view of the
                // host in place once no pass holds it.
                drop(observed);
                let changes = plan.changes.clone();
                if dry_run || plan.is_empty() {
                    return PassResult::Ran {
                        changes,
                        outcomes: Vec::new(),
                        facts: published,
                        notes,
                    };
                }
                match tokio::time::timeout(apply_timeout, r.apply(spec, plan)).await {
                    Ok(outcomes) => PassResult::Ran {
                        changes,
                        outcomes,
                        facts: published,
                        notes,
                    },
                    Err(_) => {
                        PassResult::Failed(format!("apply timed out after {apply_timeout:?}"))
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// Timing knobs of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Period of drift-repair passes (jittered by ±10%).
    pub resync: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long shutdown waits for an in-flight pass before abandoning it.
    pub shutdown_grace: Duration,
    /// Passes in a row that still find changes right after applying before the
    /// reconciler is reported Degraded (something else keeps changing the host).
    pub max_verify_passes: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(60),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(20),
            max_verify_passes: 3,
        }
    }
}

/// A status change plus the journal entries of the pass that produced it.
#[derive(Clone, Debug)]
pub struct Report {
    pub status: ReconcilerStatus,
    pub journal: Vec<(String, String)>,
}

/// Exponential backoff with jitter: `min · 2^n`, capped at `max`, then scaled by a
/// random factor in [0.5, 1.0] so that failing reconcilers do not retry in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            failures: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.failures.min(20));
        self.failures = self.failures.saturating_add(1);
        exp.min(self.max).mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.9 + fastrand::f64() * 0.2)
}

/// The running engine: feed it documents, read its reports, shut it down.
pub struct Engine {
    docs: watch::Sender<Option<Arc<Document>>>,
    facts: watch::Sender<Arc<Facts>>,
    shutdown: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Engine {
    /// Starts one task per section. Reports (status changes and journal entries) go to
    /// `reports`; the caller persists them.
    pub fn start(
        sections: Vec<Arc<dyn Section>>,
        cfg: EngineConfig,
        initial: Option<Arc<Document>>,
        reports: mpsc::UnboundedSender<Report>,
    ) -> Engine {
        let (docs, _) = watch::channel(initial);
        let (facts, _) = watch::channel(Arc::new(Facts::default()));
        let (shutdown, _) = watch::channel(false);
        let tasks = sections
            .into_iter()
            .map(|s| {
                let worker = Worker {
                    section: s.clone(),
                    cfg: cfg.clone(),
                    docs: docs.subscribe(),
                    facts_rx: facts.subscribe(),
                    facts_tx: facts.clone(),
                    shutdown: shutdown.subscribe(),
                    reports: reports.clone(),
                    status: None,
                    notes: Vec::new(),
                };
                tokio::spawn(
                    worker
                        .run()
                        .instrument(tracing::info_span!("reconciler", name = s.name())),
                )
            })
            .collect();
        Engine {
            docs,
            facts,
            shutdown,
            tasks: std::sync::Mutex::new(tasks),
        }
    }

    /// Hands a new (validated, stored) document to every reconciler.
    pub fn push(&self, doc: Arc<Document>) {
        self.docs.send_replace(Some(doc));
    }

    /// The current observed-facts snapshot.
    pub fn facts(&self) -> Arc<Facts> {
        self.facts.borrow().clone()
    }

    /// Stops every task: in-flight passes get the grace period to finish, then are
    /// abandoned. Nothing converged is torn down.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let tasks = match self.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        for t in tasks {
            let _ = t.await;
        }
    }
}

struct Worker {
    section: Arc<dyn Section>,
    cfg: EngineConfig,
    docs: watch::Receiver<Option<Arc<Document>>>,
    facts_rx: watch::Receiver<Arc<Facts>>,
    facts_tx: watch::Sender<Arc<Facts>>,
    shutdown: watch::Receiver<bool>,
    reports: mpsc::UnboundedSender<Report>,
    status: Option<ReconcilerStatus>,
    notes: Vec<ObjectNote>,
}

impl Worker {
    async fn run(mut self) {
        let mut backoff = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max);
        let mut events = self.section.host_events();
        let watches = self.section.watches_facts();
        let mut retry_at: Option<Instant> = None;
        let mut verify_passes = 0u32;
        let mut next_resync = Instant::now() + jittered(self.cfg.resync);
        // A document present at start-up is applied at once.
        let mut triggered = self.docs.borrow().is_some();
        loop {
            if !triggered {
                let far = Instant::now() + Duration::from_secs(86_400);
                tokio::select! {
                    _ = self.shutdown.changed() => return,
                    r = self.docs.changed() => if r.is_err() { return },
                    r = self.facts_rx.changed(), if watches => if r.is_err() { return },
                    Some(()) = async { match events.as_mut() { Some(e) => e.next().await, None => None } }, if events.is_some() => {
                        // One pass for a burst of events.
                        while let Some(Some(())) = events.as_mut().and_then(|e| e.next().now_or_never()) {}
                    },
                    _ = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => {},
                    _ = tokio::time::sleep_until(next_resync) => {},
                }
            }
            triggered = false;
            if *self.shutdown.borrow() {
                return;
            }
            let Some(doc) = self.docs.borrow_and_update().clone() else {
                continue;
            };
            let facts = self.facts_rx.borrow_and_update().clone();
            retry_at = None;
            next_resync = Instant::now() + jittered(self.cfg.resync);

            let generation = doc.generation;
            if self.status.as_ref().and_then(|s| s.observed_generation) != Some(generation) {
                self.report(
                    State::Progressing,
                    format!("applying generation {generation}"),
                    None,
                    Vec::new(),
                    Vec::new(),
                );
            }
            let span = tracing::info_span!("pass", generation);
            // The pass is created inside its own task too, so even a panic while
            // building the future is contained.
            let section = self.section.clone();
            let mut handle =
                tokio::spawn(async move { section.pass(doc, facts, false).await }.instrument(span));
            let result = tokio::select! {
                r = &mut handle => r,
                _ = self.shutdown.changed() => {
                    // Let the in-flight apply finish (each step is atomic), up to the grace.
                    match tokio::time::timeout(self.cfg.shutdown_grace, &mut handle).await {
                        Ok(_) => info!("in-flight pass finished before shutdown"),
                        Err(_) => { warn!("abandoning in-flight pass at shutdown"); handle.abort(); }
                    }
                    return;
                }
            };
            let result = match result {
                Ok(r) => r,
                Err(e) if e.is_panic() => {
                    PassResult::Failed(format!("reconciler panicked: {}", panic_message(e)))
                }
                Err(e) => PassResult::Failed(format!("pass aborted: {e}")),
            };
            match result {
                PassResult::Unmanaged => {
                    backoff.reset();
                    verify_passes = 0;
                    self.report(
                        State::Unmanaged,
                        "no section in the document: nothing managed".into(),
                        Some(generation),
                        Vec::new(),
                        Vec::new(),
                    );
                }
                PassResult::Failed(msg) => {
                    let delay = backoff.next_delay();
                    warn!(error = %msg, retry_in = ?delay, "pass failed");
                    retry_at = Some(Instant::now() + delay);
                    self.report(
                        State::Degraded,
                        msg.clone(),
                        Some(generation),
                        Vec::new(),
                        vec![("*".into(), msg)],
                    );
                }
                PassResult::Ran {
                    changes,
                    outcomes,
                    facts,
                    notes,
                } => {
                    self.notes = notes;
                    if let Some(update) = facts {
                        self.facts_tx
                            .send_if_modified(|f| Arc::make_mut(f).merge(update));
                    }
                    let errors = object_errors(&outcomes);
                    let journal = journal(&changes, &errors);
                    if !errors.is_empty() {
                        let delay = backoff.next_delay();
                        warn!(failed = errors.len(), retry_in = ?delay, "some objects failed");
                        retry_at = Some(Instant::now() + delay);
                        let msg = format!("{} of {} actions failed", errors.len(), outcomes.len());
                        self.report(State::Degraded, msg, Some(generation), errors, journal);
                    } else if !changes.is_empty() {
                        // Applied: re-observe at once to verify (and publish fresh facts).
                        verify_passes += 1;
                        if verify_passes > self.cfg.max_verify_passes {
                            let delay = backoff.next_delay();
                            retry_at = Some(Instant::now() + delay);
                            let msg = format!("still {} changes after {} applies: something else keeps changing the host", changes.len(), verify_passes - 1);
                            self.report(
                                State::Degraded,
                                msg,
                                Some(generation),
                                Vec::new(),
                                journal,
                            );
                        } else {
                            info!(changes = changes.len(), "applied");
                            triggered = true;
                            self.report(
                                State::Progressing,
                                format!("applied {} changes, verifying", changes.len()),
                                Some(generation),
                                Vec::new(),
                                journal,
                            );
                        }
                    } else {
                        backoff.reset();
                        verify_passes = 0;
                        self.report(
                            State::Converged,
                            "host matches the document".into(),
                            Some(generation),
                            Vec::new(),
                            Vec::new(),
                        );
                    }
                }
            }
        }
    }

    /// Updates the status; sends a report when anything but the pass time changed.
    fn report(
        &mut self,
        state: State,
        message: String,
        generation: Option<u64>,
        object_errors: Vec<ObjectError>,
        journal: Vec<(String, String)>,
    ) {
        let now = Utc::now();
        let prev = self.status.take();
        let last_transition = match &prev {
            Some(p) if p.state == state => p.last_transition,
            _ => now,
        };
        let status = ReconcilerStatus {
            reconciler: self.section.name().to_string(),
            state,
            message,
            observed_generation: generation.or(prev.as_ref().and_then(|p| p.observed_generation)),
            last_transition,
            last_pass: Some(now),
            object_errors,
            objects: self.notes.clone(),
        };
        let unchanged = prev.as_ref().is_some_and(|p| {
            p.state == status.state
                && p.message == status.message
                && p.observed_generation == status.observed_generation
                && p.object_errors == status.object_errors
                && p.objects == status.objects
        });
        if !unchanged || !journal.is_empty() {
            let _ = self.reports.send(Report {
                status: status.clone(),
                journal,
            });
        }
        self.status = Some(status);
    }
}

/// Per-object failures among a pass's outcomes.
pub fn object_errors(outcomes: &[ObjectOutcome]) -> Vec<ObjectError> {
    outcomes
        .iter()
        .filter_map(|o| {
            o.error.as_ref().map(|e| ObjectError {
                object: o.object.clone(),
                error: e.clone(),
            })
        })
        .collect()
}

/// Journal entries of a pass: one per planned change, one per failed object.
pub fn journal(changes: &[Change], errors: &[ObjectError]) -> Vec<(String, String)> {
    let op = |c: &Change| match c.op {
        converge_core::Op::Create => "create",
        converge_core::Op::Update => "update",
        converge_core::Op::Delete => "delete",
    };
    changes
        .iter()
        .map(|c| (format!("{} {}", c.kind, c.id), op(c).to_string()))
        .chain(
            errors
                .iter()
                .map(|e| (e.object.clone(), format!("failed: {}", e.error))),
        )
        .collect()
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs one pass of every section (the `apply` and `diff` commands): first the
/// sections that do not watch facts (the publishers), concurrently, then the watchers
/// with the facts published in the first round, so a one-shot apply sees container
/// addresses from the same run instead of an empty snapshot.
pub async fn run_once(
    sections: &[Arc<dyn Section>],
    doc: Arc<Document>,
    dry_run: bool,
) -> BTreeMap<&'static str, PassResult> {
    let mut facts = Facts::default();
    let mut results = BTreeMap::new();
    for watchers in [false, true] {
        let round: Vec<_> = sections
            .iter()
            .filter(|s| s.watches_facts() == watchers)
            .collect();
        let snapshot = Arc::new(facts.clone());
        let out = futures::future::join_all(round.iter().map(|s| {
            let (s, doc, facts) = (Arc::clone(s), doc.clone(), snapshot.clone());
            isolated(async move { s.pass(doc, facts, dry_run).await })
        }))
        .await;
        for (s, r) in round.into_iter().zip(out) {
            if let PassResult::Ran {
                facts: Some(update),
                ..
            } = &r
            {
                facts.merge(update.clone());
            }
            results.insert(s.name(), r);
        }
    }
    results
}

/// Runs a pass in its own task so a panic becomes a `Failed` result.
async fn isolated(
    fut: impl std::future::Future<Output = PassResult> + Send + 'static,
) -> PassResult {
    match tokio::spawn(fut).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => {
            PassResult::Failed(format!("reconciler panicked: {}", panic_message(e)))
        }
        Err(e) => PassResult::Failed(format!("pass aborted: {e}")),
    }
}

#[cfg(test)]
mod tests;
