//! The reconcile engine: one isolated tokio task per reconciler, kube-runtime style.
//!
//! Triggers: a new document, a change in the shared observed facts (for reconcilers
//! that watch them), host events, a jittered periodic resync (drift repair), the
//! wake-ups a pass asks for (`Plan::requeue_after`, waiting objects, objects failing on
//! their own delay) and retries (soon for transient errors, back-off otherwise). A task
//! runs one pass at a time (single flight); documents that arrive meanwhile coalesce in
//! a `watch` channel, so only the newest is applied next. Each pass runs in its own
//! spawned task, so a panic is contained and reported.

use crate::document::Document;
use crate::status::{self, Failures, ObjectError, Reason, ReconcilerStatus, State};
use chrono::Utc;
use converge_core::{
    Change, Facts, FactsUpdate, HostEvent, ObjectNote, ObjectOutcome, Reconciler, Waiting,
};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

/// Result of one pass of one reconciler.
#[derive(Debug)]
pub enum PassResult {
    /// The document has no section for this reconciler.
    Unmanaged,
    /// The pass ran: planned `changes` and `waiting` objects; `outcomes` of the applied
    /// actions (empty on a dry run or an empty plan); facts to publish; when the
    /// reconciler wants its next pass.
    Ran {
        changes: Vec<Change>,
        waiting: Vec<Waiting>,
        outcomes: Vec<ObjectOutcome>,
        facts: Option<FactsUpdate>,
        notes: Vec<ObjectNote>,
        requeue_after: Option<Duration>,
        /// How many objects the reconciler owns, as observed (`Reconciler::owned`).
        owned: Option<u64>,
    },
    /// Observing the host failed (or the pass panicked / timed out): nothing applied.
    /// `transient` failures are retried soon without Degraded.
    Failed { error: String, transient: bool },
}

impl PassResult {
    fn failed(error: String) -> Self {
        PassResult::Failed {
            error,
            transient: false,
        }
    }
}

/// A reconciler bound to its section of the document, with its types erased so the
/// engine can hold all of them in one list.
pub trait Section: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn watches_facts(&self) -> bool;
    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>>;
    fn pass(
        &self,
        doc: Arc<Document>,
        facts: Arc<Facts>,
        dry_run: bool,
    ) -> BoxFuture<'static, PassResult>;
}

/// Picks a reconciler's spec out of the document: borrowed when it is one section,
/// owned when the reconciler manages several (containers and networks); None when the
/// document leaves it unmanaged.
pub type Selector<S> = fn(&Document) -> Option<Cow<'_, S>>;

/// Adapter from a typed [`Reconciler`] plus a section selector to a [`Section`].
pub struct Bound<R: Reconciler>
where
    R::Spec: Clone,
{
    reconciler: Arc<R>,
    select: Selector<R::Spec>,
    observe_timeout: Duration,
    apply_timeout: Duration,
}

impl<R: Reconciler> Bound<R>
where
    R::Spec: Clone,
{
    pub fn new(reconciler: R, select: Selector<R::Spec>) -> Self {
        Self {
            reconciler: Arc::new(reconciler),
            select,
            observe_timeout: Duration::from_secs(30),
            apply_timeout: Duration::from_secs(300),
        }
    }
}

impl<R: Reconciler> Section for Bound<R>
where
    R::Spec: Clone,
{
    fn name(&self) -> &'static str {
        self.reconciler.name()
    }

    fn watches_facts(&self) -> bool {
        self.reconciler.watches_facts()
    }

    fn host_events(&self) -> Option<BoxStream<'static, HostEvent>> {
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
                let spec = spec.as_ref();
                let observed = match tokio::time::timeout(observe_timeout, r.observe(spec)).await {
                    Ok(Ok(o)) => o,
                    Ok(Err(e)) => {
                        return PassResult::Failed {
                            transient: e.retry() == converge_core::Retry::Soon,
                            error: format!("observe: {e}"),
                        }
                    }
                    Err(_) => {
                        return PassResult::failed(format!(
                            "observe timed out after {observe_timeout:?}"
                        ))
                    }
                };
                let published = r.publish(&observed);
                let notes = r.notes(&observed);
                let owned = r.owned(&observed);
                let mut plan = r.plan(spec, &observed, &facts);
                // Released before apply: a reconciler may update its cached view of the
                // host in place once no pass holds it.
                drop(observed);
                let changes = plan.changes.clone();
                let requeue_after = plan.requeue_after;
                let waiting = std::mem::take(&mut plan.waiting);
                let ran = |outcomes| PassResult::Ran {
                    changes,
                    waiting,
                    outcomes,
                    facts: published,
                    notes,
                    requeue_after,
                    owned,
                };
                if dry_run || plan.is_empty() {
                    return ran(Vec::new());
                }
                match tokio::time::timeout(apply_timeout, r.apply(plan)).await {
                    Ok(outcomes) => ran(outcomes),
                    Err(_) => {
                        PassResult::failed(format!("apply timed out after {apply_timeout:?}"))
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
    /// Delay before retrying a transient failure (jittered to [0.5, 1]×).
    pub transient_retry: Duration,
    /// Transient failures in a row before they count as real ones (Degraded, back-off).
    pub max_transient_retries: u32,
    /// Where each pass is counted (`--metrics-listen`); none: not counted.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(60),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(20),
            max_verify_passes: 3,
            transient_retry: Duration::from_millis(200),
            max_transient_retries: 5,
            metrics: None,
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

/// How often each worker's loop beats, idle or while a pass runs.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// The engine's liveness: each worker's loop records when it last went round (every
/// [`HEARTBEAT`], and after every pass). The systemd watchdog is fed only while every
/// worker beats, so a wedged worker (or a blocked runtime) gets the agent restarted.
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    /// Per worker: milliseconds since `start` at its last beat.
    beats: Vec<AtomicU64>,
}

impl Heartbeat {
    fn new(workers: usize) -> Self {
        Heartbeat {
            start: Instant::now(),
            beats: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn beat(&self, worker: usize) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(b) = self.beats.get(worker) {
            b.store(now, Ordering::Relaxed);
        }
    }

    /// Time since the worker that beat longest ago last beat (zero without workers).
    pub fn stalest(&self) -> Duration {
        let now = self.start.elapsed();
        self.beats
            .iter()
            .map(|b| now.saturating_sub(Duration::from_millis(b.load(Ordering::Relaxed))))
            .max()
            .unwrap_or_default()
    }
}

/// The running engine: feed it documents, read its reports, shut it down.
pub struct Engine {
    docs: watch::Sender<Option<Arc<Document>>>,
    facts: watch::Sender<Arc<Facts>>,
    shutdown: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    heartbeat: Arc<Heartbeat>,
    /// Workers that have not finished their first pass yet (a worker started without a
    /// document has none to do).
    first_passes: watch::Receiver<usize>,
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
        let heartbeat = Arc::new(Heartbeat::new(sections.len()));
        let (first_tx, first_passes) = watch::channel(sections.len());
        let first_tx = Arc::new(first_tx);
        let tasks = sections
            .into_iter()
            .enumerate()
            .map(|(index, s)| {
                let worker = Worker {
                    heartbeat: (heartbeat.clone(), index),
                    first_pass: Some(first_tx.clone()),
                    section: s.clone(),
                    cfg: cfg.clone(),
                    docs: docs.subscribe(),
                    facts_rx: facts.subscribe(),
                    facts_tx: facts.clone(),
                    shutdown: shutdown.subscribe(),
                    reports: reports.clone(),
                    status: None,
                    notes: Vec::new(),
                    #[cfg(debug_assertions)]
                    stall_at: None,
                    owned: None,
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
            heartbeat,
            first_passes,
        }
    }

    /// The workers' liveness, for the watchdog.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// How many workers still owe their first pass; zero once every reconciler has
    /// finished one (or the engine started without a document).
    pub fn first_passes(&self) -> watch::Receiver<usize> {
        self.first_passes.clone()
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
    /// The engine's heartbeat and this worker's slot in it.
    heartbeat: (Arc<Heartbeat>, usize),
    /// Counted down once, when this worker's first pass is done.
    first_pass: Option<Arc<watch::Sender<usize>>>,
    cfg: EngineConfig,
    docs: watch::Receiver<Option<Arc<Document>>>,
    facts_rx: watch::Receiver<Arc<Facts>>,
    facts_tx: watch::Sender<Arc<Facts>>,
    shutdown: watch::Receiver<bool>,
    reports: mpsc::UnboundedSender<Report>,
    status: Option<ReconcilerStatus>,
    notes: Vec<ObjectNote>,
    /// Debug builds: when this worker wedges (`CONVERGE_DEBUG_STALL_ENGINE`).
    #[cfg(debug_assertions)]
    stall_at: Option<Instant>,
    owned: Option<u64>,
}

/// The timers and counters of one worker between passes.
struct Schedule {
    backoff: Backoff,
    /// Retry after a failure (back-off or transient).
    retry_at: Option<Instant>,
    /// The wake-up the last pass asked for.
    requeue_at: Option<Instant>,
    next_resync: Instant,
    /// Passes in a row that applied changes, each verifying the one before it.
    verify_passes: u32,
    /// The generation the last pass worked from.
    last_generation: Option<u64>,
    transient_streak: u32,
}

/// How a pass ended, for the status and the next wake-up.
struct Verdict {
    state: State,
    message: String,
    errors: Vec<ObjectError>,
    /// Run again at once (verify an apply).
    again: bool,
}

/// Host events read by a task of their own, so that they keep being read while a pass
/// runs and a burst that arrives meanwhile wakes one pass. A source read only between
/// passes (an HTTP event stream under hyper's backpressure) hands its backlog over one
/// event at a time, each waking its own pass: 200 containers created by one pass were
/// followed by 349 passes over 2.5 minutes (`benches/scale_node.sh`). One event waits
/// at most; the others of the burst are dropped (a pass observes everything anyway).
/// Dropping the returned stream stops the task.
fn coalesced(events: BoxStream<'static, HostEvent>) -> BoxStream<'static, HostEvent> {
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let (tx, rx) = mpsc::channel(1);
    let reader = AbortOnDrop(tokio::spawn(async move {
        let mut events = events;
        while let Some(event) = events.next().await {
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(event) {
                return;
            }
        }
    }));
    futures::stream::unfold((rx, reader), |(mut rx, reader)| async move {
        let event = rx.recv().await?;
        Some((event, (rx, reader)))
    })
    .boxed()
}

/// Whether a pass started for `reason` repairs drift: a resync or a host event found
/// the host changed, and the retries and verifications that finish such a repair are
/// part of it (a repair that failed once and succeeded on its retry is still one);
/// a document, facts or a requested wake-up start something else.
fn repairs_drift(chain: bool, reason: &Reason) -> bool {
    match reason {
        Reason::Resync | Reason::HostEvent(_) => true,
        Reason::Retry | Reason::Verify => chain,
        Reason::Document | Reason::Facts | Reason::Requeue => false,
    }
}

impl Worker {
    async fn run(mut self) {
        let mut sched = Schedule {
            backoff: Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max),
            retry_at: None,
            requeue_at: None,
            next_resync: Instant::now() + jittered(self.cfg.resync),
            verify_passes: 0,
            last_generation: None,
            transient_streak: 0,
        };
        let mut events = self.section.host_events().map(coalesced);
        let mut drift = false;
        let watches = self.section.watches_facts();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A document present at start-up is applied at once; without one there is no
        // first pass to wait for.
        let mut next = self.docs.borrow().is_some().then_some(Reason::Document);
        if next.is_none() {
            self.first_pass_done();
        }
        loop {
            self.beat().await;
            let reason = match next.take() {
                Some(r) => r,
                None => loop {
                    let far = Instant::now() + Duration::from_secs(86_400);
                    tokio::select! {
                        _ = self.shutdown.changed() => return,
                        r = self.docs.changed() => if r.is_err() { return } else { break Reason::Document },
                        r = self.facts_rx.changed(), if watches => if r.is_err() { return } else { break Reason::Facts },
                        Some(HostEvent(object)) = async { match events.as_mut() { Some(e) => e.next().await, None => None } }, if events.is_some() => {
                            // One pass for a burst of events.
                            while let Some(Some(_)) = events.as_mut().and_then(|e| e.next().now_or_never()) {}
                            break Reason::HostEvent(object)
                        },
                        _ = tokio::time::sleep_until(sched.retry_at.unwrap_or(far)), if sched.retry_at.is_some() => break Reason::Retry,
                        _ = tokio::time::sleep_until(sched.requeue_at.unwrap_or(far)), if sched.requeue_at.is_some() => break Reason::Requeue,
                        _ = tokio::time::sleep_until(sched.next_resync) => break Reason::Resync,
                        _ = tick.tick() => self.beat().await,
                    }
                },
            };
            if *self.shutdown.borrow() {
                return;
            }
            // A pass that takes a document it has not seen yet is that document's pass,
            // whichever trigger woke it (select! picks among ready ones at random).
            let reason = if reason != Reason::Document && self.docs.has_changed().unwrap_or(false) {
                Reason::Document
            } else {
                reason
            };
            let Some(doc) = self.docs.borrow_and_update().clone() else {
                continue;
            };
            let facts = self.facts_rx.borrow_and_update().clone();
            sched.retry_at = None;
            sched.requeue_at = None;
            sched.next_resync = Instant::now() + jittered(self.cfg.resync);

            let generation = doc.generation;
            // Only verify passes of one generation count as applies in a row: changes a
            // new document brings (a burst verified one after another) or that a trigger
            // found are not "something else keeps changing the host".
            if reason != Reason::Verify || sched.last_generation != Some(generation) {
                sched.verify_passes = 0;
            }
            sched.last_generation = Some(generation);
            if self.status.as_ref().and_then(|s| s.observed_generation) != Some(generation) {
                let progressing = Verdict {
                    state: State::Progressing,
                    message: format!("applying generation {generation}"),
                    errors: Vec::new(),
                    again: false,
                };
                self.report(progressing, None, &reason, Vec::new(), Vec::new());
            }
            drift = repairs_drift(drift, &reason);
            let span = tracing::info_span!("pass", generation, reason = %reason);
            // The pass is created inside its own task too, so even a panic while
            // building the future is contained.
            let section = self.section.clone();
            let started = Instant::now();
            let mut handle =
                tokio::spawn(async move { section.pass(doc, facts, false).await }.instrument(span));
            // The loop keeps beating while the pass runs (each pass is bounded by its
            // observe and apply timeouts).
            let result = loop {
                tokio::select! {
                    r = &mut handle => break r,
                    _ = self.shutdown.changed() => {
                        // Let the in-flight apply finish (each step is atomic), up to the grace.
                        match tokio::time::timeout(self.cfg.shutdown_grace, &mut handle).await {
                            Ok(_) => info!("in-flight pass finished before shutdown"),
                            Err(_) => { warn!("abandoning in-flight pass at shutdown"); handle.abort(); }
                        }
                        return;
                    }
                    _ = tick.tick() => self.beat().await,
                }
            };
            let result = match result {
                Ok(r) => r,
                Err(e) if e.is_panic() => {
                    PassResult::failed(format!("reconciler panicked: {}", panic_message(e)))
                }
                Err(e) => PassResult::failed(format!("pass aborted: {e}")),
            };
            if let Some(m) = &self.cfg.metrics {
                m.pass(self.section.name(), started.elapsed(), drift, &result);
            }
            let (verdict, waiting, journal) = self.judge(result, &mut sched);
            // Verify an apply at once, whatever else is scheduled.
            next = verdict.again.then_some(Reason::Verify);
            self.report(verdict, Some(generation), &reason, waiting, journal);
            self.first_pass_done();
        }
    }

    /// Records that this worker's loop is alive. In debug builds,
    /// `CONVERGE_DEBUG_STALL_ENGINE=SECS` wedges the worker for good SECS seconds after
    /// its first pass (it stops beating), to test that systemd's watchdog restarts the
    /// agent.
    async fn beat(&mut self) {
        #[cfg(debug_assertions)]
        if let Some(at) = self.stall_at {
            if Instant::now() >= at {
                warn!("debug fault CONVERGE_DEBUG_STALL_ENGINE: this worker stops for good");
                std::future::pending::<()>().await;
            }
        }
        let (heartbeat, index) = &self.heartbeat;
        heartbeat.beat(*index);
    }

    /// Counts this worker's first pass as done (once).
    fn first_pass_done(&mut self) {
        if let Some(tx) = self.first_pass.take() {
            tx.send_modify(|n| *n = n.saturating_sub(1));
            #[cfg(debug_assertions)]
            if let Some(secs) = std::env::var("CONVERGE_DEBUG_STALL_ENGINE")
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
            {
                self.stall_at = Some(Instant::now() + Duration::from_secs(secs));
            }
        }
    }

    /// Decides the status and the next wake-up from a pass's result: what the pass reads
    /// as ([`read`], the rule `converge apply` uses too), then the retry policy.
    fn judge(
        &mut self,
        result: PassResult,
        sched: &mut Schedule,
    ) -> (Verdict, Vec<ObjectError>, Vec<(String, String)>) {
        let now = Instant::now();
        let verdict = |state, message: String, errors| Verdict {
            state,
            message,
            errors,
            again: false,
        };
        let reading = read(&result);
        let mut waiting = Vec::new();
        let mut journal_lines = Vec::new();
        match result {
            PassResult::Unmanaged => self.owned = None,
            PassResult::Failed { ref error, .. } => {
                journal_lines.push(("*".to_string(), error.clone()));
            }
            PassResult::Ran {
                changes,
                waiting: w,
                outcomes,
                facts,
                notes,
                requeue_after,
                owned,
            } => {
                self.notes = notes;
                self.owned = owned;
                if let Some(update) = facts {
                    self.facts_tx
                        .send_if_modified(|f| Arc::make_mut(f).merge(update));
                }
                let failures = Failures::of(&outcomes);
                journal_lines = journal(&changes, &failures.all());
                // An object stuck until the operator acts is an event once, when it
                // starts failing (or fails differently), not at every look.
                let before = self.status.as_ref().map(|s| s.object_errors.as_slice());
                let new = status::stuck(&w).into_iter().filter(|e| {
                    !before
                        .unwrap_or_default()
                        .iter()
                        .any(|b| b.object == e.object && b.error == e.error)
                });
                journal_lines.extend(journal(&[], &new.collect::<Vec<_>>()));
                // Wake-ups the reconciler asked for: the plan's, waiting objects', and
                // objects failing on their own delay.
                let delays = w.iter().filter_map(|w| w.retry_after);
                sched.requeue_at =
                    converge_core::earliest(requeue_after, delays.chain(failures.later_after))
                        .map(|d| now + d);
                waiting = status::waiting(&w);
            }
        }
        let v = match reading {
            Reading::Unmanaged => {
                sched.backoff.reset();
                sched.verify_passes = 0;
                sched.transient_streak = 0;
                verdict(
                    State::Unmanaged,
                    "no section in the document: nothing managed".to_string(),
                    Vec::new(),
                )
            }
            // Transient failures retry soon, until too many come in a row.
            Reading::Failed {
                error,
                transient: true,
            } if self.transient(sched) => {
                warn!(error = %error, "pass failed (transient), retrying soon");
                verdict(State::Progressing, format!("retrying: {error}"), Vec::new())
            }
            Reading::ObjectsFailed {
                errors,
                transient: true,
                ..
            } if self.transient(sched) => verdict(
                State::Progressing,
                format!(
                    "retrying {} transient failures",
                    // Those retried soon (the others, if any, on their own delay).
                    errors.iter().filter(|e| e.retry_in_secs.is_none()).count()
                ),
                errors,
            ),
            Reading::Failed { error, .. } => {
                sched.transient_streak = 0;
                let delay = sched.backoff.next_delay();
                warn!(error = %error, retry_in = ?delay, "pass failed");
                sched.retry_at = Some(now + delay);
                verdict(State::Degraded, error, Vec::new())
            }
            Reading::ObjectsFailed {
                errors, message, ..
            } => {
                let delay = sched.backoff.next_delay();
                warn!(failed = errors.len(), retry_in = ?delay, "some objects failed");
                sched.retry_at = Some(now + delay);
                verdict(State::Degraded, message, errors)
            }
            Reading::Applied { changes, errors } => {
                sched.transient_streak = 0;
                // Applied: re-observe at once to verify (and publish fresh facts).
                sched.verify_passes += 1;
                if sched.verify_passes > self.cfg.max_verify_passes {
                    sched.retry_at = Some(now + sched.backoff.next_delay());
                    let msg = format!("still {changes} changes after {} applies: something else keeps changing the host", sched.verify_passes - 1);
                    verdict(State::Degraded, msg, errors)
                } else {
                    info!(changes, "applied");
                    let mut v = verdict(
                        State::Progressing,
                        format!("applied {changes} changes, verifying"),
                        errors,
                    );
                    v.again = true;
                    v
                }
            }
            Reading::Settled {
                state,
                message,
                errors,
            } => {
                sched.transient_streak = 0;
                sched.backoff.reset();
                sched.verify_passes = 0;
                verdict(state, message, errors)
            }
        };
        (v, waiting, journal_lines)
    }

    /// Counts a transient failure: schedules a quick retry and returns true, or
    /// returns false once too many came in a row (then it is treated as a real one).
    fn transient(&self, sched: &mut Schedule) -> bool {
        sched.transient_streak += 1;
        if sched.transient_streak > self.cfg.max_transient_retries {
            return false;
        }
        let delay = self
            .cfg
            .transient_retry
            .mul_f64(0.5 + fastrand::f64() * 0.5);
        sched.retry_at = Some(Instant::now() + delay);
        true
    }

    /// Updates the status; sends a report when anything but the pass time changed.
    fn report(
        &mut self,
        verdict: Verdict,
        generation: Option<u64>,
        reason: &Reason,
        waiting: Vec<ObjectError>,
        journal: Vec<(String, String)>,
    ) {
        let now = Utc::now();
        let prev = self.status.take();
        let last_transition = match &prev {
            Some(p) if p.state == verdict.state => p.last_transition,
            _ => now,
        };
        let status = ReconcilerStatus {
            reconciler: self.section.name().to_string(),
            state: verdict.state,
            message: verdict.message,
            observed_generation: generation.or(prev.as_ref().and_then(|p| p.observed_generation)),
            last_transition,
            last_pass: Some(now),
            reason: Some(reason.clone()),
            object_errors: verdict.errors,
            waiting,
            objects: self.notes.clone(),
            owned: self.owned,
        };
        let unchanged = prev.as_ref().is_some_and(|p| {
            p.state == status.state
                && p.reason == status.reason
                && p.message == status.message
                && p.observed_generation == status.observed_generation
                && p.object_errors == status.object_errors
                && p.waiting == status.waiting
                && p.objects == status.objects
                && p.owned == status.owned
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

/// What a pass's result reads as, before any retry policy: the one rule behind the
/// agent's status ([`Worker::judge`], which adds retries and verify passes) and
/// `converge apply`'s ([`judge_once`], which has neither).
#[derive(Debug)]
enum Reading {
    Unmanaged,
    /// The pass itself failed (observe, a panic, a timeout).
    Failed {
        error: String,
        transient: bool,
    },
    /// Objects failed with back-off or soon retries; `transient`: soon ones only.
    ObjectsFailed {
        errors: Vec<ObjectError>,
        message: String,
        transient: bool,
    },
    /// Changes were applied (and must be verified); `errors`: objects failing on their
    /// own delay meanwhile.
    Applied {
        changes: usize,
        errors: Vec<ObjectError>,
    },
    /// Nothing to apply: Converged, or Progressing while objects fail on their own
    /// delay or a change is under way.
    Settled {
        state: State,
        message: String,
        errors: Vec<ObjectError>,
    },
}

fn read(result: &PassResult) -> Reading {
    let (changes, waiting, outcomes) = match result {
        PassResult::Unmanaged => return Reading::Unmanaged,
        PassResult::Failed { error, transient } => {
            return Reading::Failed {
                error: error.clone(),
                transient: *transient,
            }
        }
        PassResult::Ran {
            changes,
            waiting,
            outcomes,
            ..
        } => (changes, waiting, outcomes),
    };
    let failures = Failures::of(outcomes);
    if !failures.backoff.is_empty() || !failures.soon.is_empty() {
        let errors = failures.all();
        return Reading::ObjectsFailed {
            message: status::failed_message(outcomes, &errors),
            transient: failures.backoff.is_empty(),
            errors,
        };
    }
    if !changes.is_empty() {
        return Reading::Applied {
            changes: changes.len(),
            errors: failures.all(),
        };
    }
    let settled = |state, message: String, errors| Reading::Settled {
        state,
        message,
        errors,
    };
    // Objects stuck until the operator acts: Degraded, listed with the errors.
    let stuck = status::stuck(waiting);
    if !stuck.is_empty() {
        let names: Vec<&str> = stuck.iter().take(3).map(|e| e.object.as_str()).collect();
        let more = match stuck.len() {
            n if n > 3 => format!(" and {} more", n - 3),
            _ => String::new(),
        };
        let mut errors = stuck.clone();
        errors.extend(failures.all());
        return settled(
            State::Degraded,
            format!("{}{more} failed", names.join(", ")),
            errors,
        );
    }
    if !failures.later.is_empty() {
        let n = failures.later.len();
        return settled(
            State::Progressing,
            format!("{n} objects failing, each retried on its own delay"),
            failures.all(),
        );
    }
    // What each waits for is in `waiting` (a switch, a backup running).
    match waiting.iter().filter(|w| w.in_progress).count() {
        0 => {}
        1 => return settled(State::Progressing, "1 change under way".into(), Vec::new()),
        n => {
            return settled(
                State::Progressing,
                format!("{n} changes under way"),
                Vec::new(),
            )
        }
    }
    let message = if waiting.is_empty() {
        "host matches the document".to_string()
    } else {
        format!(
            "host matches the document; {} objects waiting",
            waiting.len()
        )
    };
    settled(State::Converged, message, Vec::new())
}

/// `converge apply`'s status of one reconciler: its apply pass and the verify pass after
/// it, read by the engine's rule, with no retry to wait for (every failure counts, and
/// changes still there after one apply mean something else keeps changing the host).
pub fn judge_once(
    applied: &PassResult,
    verify: Option<&PassResult>,
) -> (State, String, Vec<ObjectError>) {
    match read(applied) {
        Reading::Unmanaged => {
            return (
                State::Unmanaged,
                "no section in the document".into(),
                Vec::new(),
            )
        }
        Reading::Failed { error, .. } => return (State::Degraded, error, Vec::new()),
        Reading::ObjectsFailed {
            errors, message, ..
        } => return (State::Degraded, message, errors),
        Reading::Applied { errors, .. } | Reading::Settled { errors, .. } if !errors.is_empty() => {
            let outcomes = match applied {
                PassResult::Ran { outcomes, .. } => outcomes.as_slice(),
                _ => &[],
            };
            return (
                State::Degraded,
                status::failed_message(outcomes, &errors),
                errors,
            );
        }
        Reading::Applied { .. } | Reading::Settled { .. } => {}
    }
    match verify.map(read) {
        Some(Reading::Failed { error, .. }) => {
            (State::Degraded, format!("verify: {error}"), Vec::new())
        }
        Some(Reading::ObjectsFailed {
            errors, message, ..
        }) => (State::Degraded, message, errors),
        Some(Reading::Applied { changes, .. }) => (
            State::Degraded,
            format!("{changes} changes remain after apply"),
            Vec::new(),
        ),
        Some(Reading::Settled {
            state,
            message,
            errors,
        }) => (state, message, errors),
        Some(Reading::Unmanaged) | None => (
            State::Converged,
            "host matches the document".into(),
            Vec::new(),
        ),
    }
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
            PassResult::failed(format!("reconciler panicked: {}", panic_message(e)))
        }
        Err(e) => PassResult::failed(format!("pass aborted: {e}")),
    }
}

#[cfg(test)]
mod tests;
